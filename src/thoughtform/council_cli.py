"""``thoughtform council``: voices take turns in the terminal, each streamed in its colour under
its label, then the resonance matrix (who echoes whom). Thin over :mod:`thoughtform.council`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.style import Style
from rich.text import Text

from .council import (
    DEFAULT_TURN_TOKENS,
    POLICIES,
    USER,
    Council,
    CouncilError,
    Turn,
    continuation_scorer,
)
from .render import control_label, split_controls
from .render.terminal import label_text, voice_style
from .resonance import VoiceMatrix, council_scores, echo_scores, voice_matrix
from .voices import VoiceSet

DEFAULT_MEMBERS = "Echo,Doubt,Pulse,Shift"

__all__ = ["DEFAULT_MEMBERS", "build_parser", "cli_council", "cmd_council", "format_matrix"]


def build_parser() -> argparse.ArgumentParser:
    """The ``thoughtform council`` argument parser."""
    p = argparse.ArgumentParser(
        prog="thoughtform council",
        description="A council of voices: each turn one member speaks (its persona, the "
        "conversation so far in markers, your prompt); prints the resonance matrix at the end.",
    )
    p.add_argument("--prompt", help="what you say to the council first (required)")
    p.add_argument(
        "--members",
        default=DEFAULT_MEMBERS,
        help=f"members in order, comma-separated (default: {DEFAULT_MEMBERS})",
    )
    p.add_argument(
        "--policy",
        default="round-robin",
        choices=POLICIES,
        help="who speaks next: list (each once), round-robin, natural (SillyTavern: named "
        "first, then by talkativeness), model (the model's marker probabilities), manual "
        "(asked on stdin) (default: round-robin)",
    )
    p.add_argument("--turns", type=int, default=8, help="member turns to run (default: 8)")
    p.add_argument("--voices", default="seed", help="voice set: a preset or YAML (default: seed)")
    p.add_argument(
        "--backend", default="llamacpp", help="llamacpp | openai | transformers | replay"
    )
    p.add_argument(
        "--model",
        help="embedded | embedded-voices (default on llamacpp/transformers) | a .gguf path | "
        "a local HF directory | the server's model (openai) | the recording (replay)",
    )
    p.add_argument("--base-url", help="OpenAI-compatible server URL (env THOUGHTFORM_BASE_URL)")
    p.add_argument("--api-key", help="API key (env THOUGHTFORM_API_KEY)")
    p.add_argument("--system", help="extra system prompt text for every turn (default: none)")
    p.add_argument("--seed", type=int, help="seed: speakers and replies repeat (default: random)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_TURN_TOKENS,
        help=f"tokens per turn at most (default: {DEFAULT_TURN_TOKENS})",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="default: 0.7")
    p.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    p.add_argument("--mute", action="append", default=[], help="a member who never speaks")
    p.add_argument(
        "--talkativeness",
        action="append",
        default=[],
        metavar="NAME=P",
        help="natural: chance (0..1) a member speaks up unasked (default: 0.5 each)",
    )
    p.add_argument(
        "--allow-self-responses",
        action="store_true",
        help="natural and model: the last speaker may speak again (default: barred)",
    )
    p.add_argument(
        "--argmax",
        action="store_true",
        help="model: the most likely member speaks (default: sampled from the probabilities)",
    )
    p.add_argument(
        "--counterfactual",
        action="store_true",
        help="also print counterfactual resonance: how much less expected each turn is without "
        "each earlier one (llamacpp or transformers; one scoring pass per pair; default: off)",
    )
    p.add_argument("--trace", help="write the council trace JSONL here (default: none)")
    p.add_argument("--rate", type=float, default=0.0, help="replay: tokens/s, 0 = unthrottled")
    return p


def cli_council(argv: list[str]) -> int:
    """Run ``thoughtform council ...`` with ``argv`` (usage errors exit 2)."""
    return cmd_council(build_parser().parse_args(argv))


def _safe(out: Text, s: str, style: Style) -> None:
    """Model text into ``out``, control characters as visible chips (never markup)."""
    for piece, ctrl in split_controls(s):
        out.append(f"⟨{control_label(piece)}⟩" if ctrl else piece, style)


def _talkativeness(specs: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, val = spec.partition("=")
        try:
            p = float(val)
        except ValueError:
            p = -1.0
        if not sep or not name.strip() or not 0.0 <= p <= 1.0:
            raise CouncilError(f"--talkativeness {spec!r}: expected NAME=P with P in 0..1")
        out[name.strip()] = p
    return out


def format_matrix(m: VoiceMatrix, title: str, percent: bool = True) -> str:
    """A voice x voice matrix as a plain text table (rows: speaker, columns: drawn upon),
    values as percentages or (``percent=False``) as signed numbers."""
    labels = list(m.labels)
    w = max([len(x) for x in labels] + [6])
    head = " " * (w + 2) + "  ".join(f"{x[:w]:>{w}}" for x in labels)
    rows = [title, head]
    for r, name in enumerate(labels):
        if all(v is None for v in m.values[r]):
            continue  # a speaker with no earlier turns to draw on (the user, the first voice)
        cells = [
            f"{'-':>{w}}"
            if v is None
            else (f"{100 * v:>{w - 1}.0f}%" if percent else f"{v:>+{w}.2f}")
            for v in m.values[r]
        ]
        rows.append(f"{name[:w]:<{w}}  " + "  ".join(cells))
    return "\n".join(rows)


class _Printer:
    """Streams council events to a rich console: a label line per turn, then its text."""

    def __init__(self, console: Console, voices: VoiceSet) -> None:
        self.console = console
        self.voices = voices
        self.open = False
        self._ws = ""  # trailing whitespace held back: shown only if more text follows

    def turn(self, t: Turn) -> None:
        label = label_text(self.voices, t.voice or USER)
        if t.by == "model" and t.probs:
            ranked = sorted(t.probs.items(), key=lambda kv: -kv[1])
            label.append("  model: " + " · ".join(f"{k} {v:.2f}" for k, v in ranked), "dim")
        elif t.by in ("forced", "user") and t.source == "model":
            label.append("  (forced)" if t.by == "forced" else "  (your pick)", "dim")
        self.console.print(label)
        self.open = True

    def text(self, t: Turn, delta: str) -> None:
        s = self._ws + delta
        body = s.rstrip()
        self._ws = s[len(body) :]
        if body:
            out = Text()
            _safe(out, body, voice_style(self.voices, t.voice or USER))
            self.console.print(out, end="")

    def end(self, t: Turn) -> None:
        note = {"cancelled": "(stopped)", "error": f"(error: {t.message})", "length": "…"}
        extra = note.get(t.finish, "")
        self.console.print(Text(f" {extra}" if extra else "", "dim"))
        self.console.print()
        self.open = False
        self._ws = ""


def _manual_chooser(stdin: TextIO, console: Console) -> Any:
    def choose(council: Council, eligible: list[str]) -> str | None:
        console.print(
            Text(f"who speaks next? {' / '.join(eligible)} (empty: stop) ", "bold"), end=""
        )
        line = stdin.readline()
        while True:
            name = line.strip()
            if not name:
                return None
            v = council.voices.get(name)
            if v is not None and v.name in eligible:
                return v.name
            console.print(Text(f"not a member who may speak: {name!r}; again: ", "bold"), end="")
            line = stdin.readline()

    return choose


def cmd_council(args: argparse.Namespace) -> int:
    """Run a council in the terminal; Ctrl-C stops the turn in progress (kept, marked)."""
    from .backends import BackendError, create_backend
    from .backends.base import Sampling
    from .cli import UserError, resolve_voices
    from .conversation import DEFAULT_MODEL, ChatSettings, backend_options
    from .trace import TraceError

    vs = resolve_voices(args.voices)
    if not args.prompt or not args.prompt.strip():
        raise UserError("council: give --prompt TEXT")
    if args.turns < 0:
        raise UserError(f"council: --turns must be >= 0, got {args.turns}")
    if args.max_tokens < 1:
        raise UserError(f"council: --max-tokens must be >= 1, got {args.max_tokens}")
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    model = args.model
    if model is None and args.backend in ("llamacpp", "transformers"):
        model = DEFAULT_MODEL
    settings = ChatSettings(
        backend=args.backend, model=model, base_url=args.base_url, api_key=args.api_key
    )
    console = Console(highlight=False)
    try:
        talk = _talkativeness(args.talkativeness)
        for m in members:  # check names before loading a model
            if vs.get(m) is None:
                raise CouncilError(
                    f"--members: unknown voice {m!r} (declared: {', '.join(vs.names()) or 'none'})"
                )
        opts = backend_options(settings)
        if args.backend == "replay":
            opts["rate"] = args.rate
        backend = create_backend(args.backend, **opts)
    except (CouncilError, BackendError, TraceError) as e:
        raise UserError(str(e)) from None
    if args.counterfactual and continuation_scorer(backend) is None:
        backend.close()
        raise UserError(
            f"--counterfactual: backend {args.backend!r} cannot score text (use llamacpp or "
            "transformers)"
        )
    owned: list[Any] = []  # the members' own backends (voice-set bindings), closed below

    def open_backend(s: ChatSettings) -> Any:
        o = backend_options(s)
        if s.backend == "replay":
            o["rate"] = args.rate
        b = create_backend(s.backend, **o)
        owned.append(b)
        return b

    try:
        try:
            council = Council(
                vs,
                members,
                backend,
                args.policy,
                sampling=Sampling(
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed,
                    max_tokens=args.max_tokens,
                ),
                seed=args.seed,
                muted=args.mute,
                talkativeness=talk,
                allow_self_responses=args.allow_self_responses,
                model_choice="argmax" if args.argmax else "sample",
                chooser=_manual_chooser(sys.stdin, console) if args.policy == "manual" else None,
                system=args.system,
                trace_path=args.trace,
                settings=settings,
                open_backend=open_backend,
            )
        except CouncilError as e:
            raise UserError(str(e)) from None
        except OSError as e:
            raise UserError(f"{args.trace}: cannot write: {e.strerror}") from None
        for m in council.members:
            b = council.backend_for(m)
            if b is not backend:
                where = f"{getattr(b, 'name', '?')} · {getattr(b, 'model_name', None) or 'default'}"
                console.print(Text(f"{m} speaks through {where}", "dim"), soft_wrap=True)
        return _run(council, args, console)
    finally:
        for b in [backend, *owned]:
            b.close()


def _run(council: Council, args: argparse.Namespace, console: Console) -> int:
    from .cli import UserError

    out = _Printer(console, council.voices)
    you = council.say(args.prompt)
    console.print(Text("you", "bold"))
    line = Text()
    _safe(line, you.text, Style())
    console.print(line)
    console.print()
    reason = "stop"
    it = council.run(args.turns)
    try:
        for ev in it:
            if ev.kind == "turn":
                out.turn(ev.turn)
            elif ev.kind == "text":
                out.text(ev.turn, ev.delta)
            else:
                out.end(ev.turn)
    except KeyboardInterrupt:
        # The council kept the interrupted turn (marked cancelled) when the stream broke off.
        if out.open and council.turns:
            out.end(council.turns[-1])
        reason = "cancelled"
    except CouncilError as e:
        council.close("error")
        raise UserError(str(e)) from None
    trace = council.close(reason)
    if len(council.turns) > 1:
        m = voice_matrix(council.turns, echo_scores(council.turns))
        console.print(
            Text(
                format_matrix(
                    m,
                    "resonance (echo): share of each speaker's words and phrases first said by",
                )
            )
        )
    if args.counterfactual and len(council.turns) > 1:
        # the library's rule (finished turns, each through its speaker's backend), as the tab's
        cf = council_scores(council, "counterfactual")
        console.print()
        console.print(
            Text(
                format_matrix(
                    voice_matrix(council.turns, cf),
                    "resonance (counterfactual): nats/token more surprising without",
                    percent=False,
                )
            )
        )
    errors = [t for t in council.turns if t.finish == "error"]
    if args.trace:
        print(f"trace: {args.trace} ({len(trace.tokens)} tokens, {len(council.turns)} turns)",
              file=sys.stderr)  # fmt: skip
    if errors:
        print(f"thoughtform: backend error: {errors[-1].message}", file=sys.stderr)
        return 1
    return 0
