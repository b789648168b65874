"""``thoughtform eval council``: do council turns stay in character on the shipped model?

For every prompt, a council of ``members`` (default: Echo, Doubt, Pulse, Shift) runs ``turns``
turns (default 8, round-robin) on the embedded model with the voices adapter through llama.cpp,
the path users run; prompt ``i`` uses seed ``seed + i``. Measures (exact, so tests can pin them):

* **in_character**: the eval's voice classifier
  (:class:`~thoughtform.evaluate.adherence.VoiceClassifier`, char n-gram TF-IDF + logistic
  regression fitted on the training set's voice segments, as ``eval adherence`` fits it) labels
  each turn's text with a voice; the fraction of turns labelled with their speaker's voice. An
  empty turn counts as a miss. Chance is 1 / (voices the classifier knows): 0.125 for seed.
* **marker_leaks**: turns whose text holds a marker of any other declared voice
  (:func:`thoughtform.council.marker_leaks`: ``[Name]``, ``[/Name]``, tags; any case).
* **empty_turns**: turns with no text.
* **echoed**: turns where the model wrote its own marker or name label (stripped from the text).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..council import Turn
    from ..voices import VoiceSet
    from .adherence import VoiceClassifier

DEFAULT_MEMBERS = ("Echo", "Doubt", "Pulse", "Shift")
DEFAULT_TURNS = 8
DEFAULT_TURN_TOKENS = 96

__all__ = [
    "CouncilEvalResult",
    "add_council_parser",
    "cli_council_eval",
    "run_councils",
    "score_councils",
]


@dataclass
class CouncilEvalResult:
    """The measures of one council evaluation and the turns they were measured on."""

    n_prompts: int
    n_turns: int
    in_character: float | None
    marker_leaks: int
    empty_turns: int
    echoed: int
    chance: float | None
    per_voice: dict[str, float] = field(default_factory=dict)
    councils: list[list[dict[str, Any]]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object."""
        r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
        return {
            "n_prompts": self.n_prompts,
            "n_turns": self.n_turns,
            "in_character": r4(self.in_character),
            "marker_leaks": self.marker_leaks,
            "empty_turns": self.empty_turns,
            "echoed": self.echoed,
            "chance": r4(self.chance),
            "per_voice": {k: r4(v) for k, v in self.per_voice.items()},
        }


def run_councils(
    prompts: Sequence[str],
    backend: Backend,
    voices: VoiceSet,
    members: Sequence[str] = DEFAULT_MEMBERS,
    turns: int = DEFAULT_TURNS,
    policy: str = "round-robin",
    seed: int = 0,
    max_tokens: int = DEFAULT_TURN_TOKENS,
    temperature: float = 0.7,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Turn]]:
    """One council per prompt (prompt ``i`` with seed ``seed + i``); the voice turns of each."""
    from ..backends.base import Sampling
    from ..council import Council

    out: list[list[Turn]] = []
    for i, prompt in enumerate(prompts):
        c = Council(
            voices,
            list(members),
            backend,
            policy,
            seed=seed + i,
            sampling=Sampling(temperature=temperature, seed=seed + i, max_tokens=max_tokens),
            alternatives=0,
        )
        c.say(prompt)
        for _ in c.run(turns):
            pass
        errors = [t for t in c.turns if t.finish == "error"]
        if errors:
            raise RuntimeError(f"generation failed: {errors[0].message}")
        out.append([t for t in c.turns if t.voice is not None])
        if progress is not None:
            progress(i + 1, len(prompts))
    return out


def score_councils(
    councils: Sequence[Sequence[Turn]], clf: VoiceClassifier, voices: VoiceSet
) -> CouncilEvalResult:
    """The measures (see the module docstring) over the voice turns of every council."""
    from ..council import marker_leaks

    turns = [t for c in councils for t in c if t.voice is not None]
    texts = [t.text for t in turns]
    said = [i for i, x in enumerate(texts) if x.strip()]
    pred = dict(zip(said, clf.predict([texts[i] for i in said]), strict=True))
    hit = [pred.get(i) == t.voice for i, t in enumerate(turns)]
    per: dict[str, list[bool]] = {}
    for t, h in zip(turns, hit, strict=True):
        per.setdefault(t.voice or "", []).append(h)
    return CouncilEvalResult(
        n_prompts=len(councils),
        n_turns=len(turns),
        in_character=sum(hit) / len(hit) if hit else None,
        marker_leaks=sum(bool(marker_leaks(t.text, voices, t.voice)) for t in turns),
        empty_turns=len(turns) - len(said),
        echoed=sum(t.echoed > 0 for t in turns),
        chance=1 / len(clf.labels) if clf.labels else None,
        per_voice={v: sum(h) / len(h) for v, h in per.items()},
        councils=[[t.to_dict() for t in c] for c in councils],
    )


def add_council_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``eval council`` subcommand on the eval CLI's subparsers."""
    a: argparse.ArgumentParser = sub.add_parser(
        "council",
        help="council turns in character on the shipped model (voices adapter)",
        description="A council per prompt (members taking turns) on the embedded model with the "
        "voices adapter, through llama.cpp; prints the share of turns the voice classifier labels "
        "with their speaker's voice, marker leaks (other voices' markers in a turn) and empty "
        "turns.",
    )
    a.add_argument("--prompts", default=None, help="prompt file, one a line (default: shipped set)")
    a.add_argument("--model", default="embedded-voices", help="model (default: embedded-voices)")
    a.add_argument(
        "--members",
        default=",".join(DEFAULT_MEMBERS),
        help=f"members in order (default: {','.join(DEFAULT_MEMBERS)})",
    )
    a.add_argument("--policy", default="round-robin", help="who speaks next (default: round-robin)")
    a.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="turns per prompt (default 8)")
    a.add_argument(
        "--dataset",
        default=None,
        help="training JSONL for the voice classifier (default: the synthetic set the shipped "
        "adapter was trained on)",
    )
    a.add_argument("--voices", default="seed", help="voice set (default seed)")
    a.add_argument("--seed", type=int, default=0, help="seed (prompt i uses seed+i)")
    a.add_argument(
        "--max-tokens", type=int, default=DEFAULT_TURN_TOKENS, help="tokens per turn (default 96)"
    )
    a.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    a.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    a.add_argument("--save", default=None, help="write each prompt's turns to this JSONL")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    return a


def cli_council_eval(args: argparse.Namespace) -> int:
    """Run ``eval council`` with parsed ``args``; 0 on success, 2 on a user mistake."""
    from pathlib import Path

    from ..backends import BackendError, create_backend
    from ..council import POLICIES, CouncilError
    from ..voices import VoiceSetError, resolve_voice_set
    from . import adherence as A
    from .cli import _fail, _training

    try:
        vs = resolve_voice_set(args.voices)
    except VoiceSetError as e:
        return _fail(str(e))
    path = Path(args.prompts) if args.prompts else A.default_prompts_path()
    if not path.is_file():
        return _fail(f"{path}: no such file")
    try:
        prompts = A.read_prompts(path)
    except UnicodeDecodeError:
        return _fail(f"{path}: not valid UTF-8")
    if args.limit is not None:
        if args.limit < 1:
            return _fail(f"--limit must be >= 1, got {args.limit}")
        prompts = prompts[: args.limit]
    if not prompts:
        return _fail(f"{path}: no prompts")
    for flag, v in (("--turns", args.turns), ("--max-tokens", args.max_tokens)):
        if v < 1:
            return _fail(f"{flag} must be >= 1, got {v}")
    if args.policy not in POLICIES or args.policy == "manual":
        return _fail(f"--policy: expected one of {', '.join(p for p in POLICIES if p != 'manual')}")
    if args.dataset is not None and not Path(args.dataset).is_file():
        return _fail(f"{args.dataset}: no such file")
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    unknown = [m for m in members if vs.get(m) is None]
    if unknown or not members:
        return _fail(f"--members: unknown voice {unknown[0]!r}" if unknown else "--members: none")
    t0 = time.perf_counter()
    try:
        clf = A.VoiceClassifier().fit(A.training_segments(_training(args.dataset, args.voices), vs))
        backend = create_backend("llamacpp", model=args.model, n_ctx=2048, seed=args.seed)
    except (CouncilError, BackendError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else repr(e))
    try:

        def progress(i: int, n: int) -> None:
            print(f"council {i}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

        councils = run_councils(
            prompts,
            backend,
            vs,
            members,
            turns=args.turns,
            policy=args.policy,
            seed=args.seed,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            progress=progress,
        )
    except (CouncilError, RuntimeError) as e:
        return _fail(str(e).splitlines()[0])
    finally:
        backend.close()
    result = score_councils(councils, clf, vs)
    if args.save:
        with open(args.save, "w", encoding="utf-8") as f:
            for p, turns in zip(prompts, result.councils, strict=True):
                f.write(json.dumps({"prompt": p, "turns": turns}, ensure_ascii=False) + "\n")
    s = result.summary()
    s["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(s))
        return 0
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"prompts        {s['n_prompts']}")
    print(f"turns          {s['n_turns']}")
    print(
        f"in character   {pct(s['in_character'])}  (classifier names the speaker; chance "
        f"{pct(s['chance'])})"
    )
    for v, x in s["per_voice"].items():
        print(f"  {v:<12} {pct(x)}")
    print(f"marker leaks   {s['marker_leaks']}  (turns holding another voice's marker)")
    print(f"empty turns    {s['empty_turns']}")
    print(f"echoed         {s['echoed']}  (turns whose own marker or label was stripped)")
    return 0
