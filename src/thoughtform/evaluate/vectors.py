"""``thoughtform eval vectors``: what do voice vectors do to the voice they steer?

For every voice with a vector and every strength (dose-response: 0, 0.5, 1, 1.5, 2), one reply
per eval prompt from the *plain* embedded model through llama.cpp (the voice system prompt, as
``--next-voice`` on the plain model gets it), with the voice's block forced to open the reply
(``SteerPlan.next_voice``) and its vector applied while it speaks (``SteerPlan.vectors``).
Prompt ``i`` uses seed ``seed + i`` at every strength, so strength 0 is the same reply as no
vector at all, token for token. Measures (exact, so tests can pin them):

* **class_share**: the eval's voice classifier
  (:class:`~thoughtform.evaluate.adherence.VoiceClassifier`, fitted on the training set's voice
  segments as ``eval adherence`` fits it) labels every segment of the steered voice that has
  text; the share labelled with that voice (pooled over prompts). **class_gain**: class_share
  at a strength minus at strength 0.
* **p_next**: at the first voice boundary after the forced block (the first ``voice_choices``
  record after the reply start's), the probability the model gives the steered voice's marker;
  the mean over the prompts that reach such a boundary (``boundaries`` counts them; None when
  none does).
* **ppl**: the perplexity of the steered voice's block tokens (every token the parser gives to
  that voice that was not forced: the marker is) under the *unsteered* model, scored by
  decoding prompt + reply in one pass with no vector; pooled over prompts,
  ``exp(sum NLL / tokens)``. **ppl_ratio**: ppl at a strength over ppl at strength 0 (the
  unsteered run's own text under the same model): the fluency cost of the vector.
* **default_strength** per voice: the strength with the largest class_gain among those with
  ppl_ratio <= ``MAX_PPL_RATIO`` (ties: the smaller strength; 0 when nothing gains).
  **mean_class_gain** and **ppl_ratio** (top level): the means over voices at their defaults.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..backends.base import GenerationRequest
    from ..trace import Trace
    from ..voices import VoiceSet
    from .adherence import VoiceClassifier

STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)
MAX_TOKENS = 48
MAX_PPL_RATIO = 1.5

__all__ = [
    "MAX_PPL_RATIO",
    "MAX_TOKENS",
    "STRENGTHS",
    "RunResult",
    "choose_default",
    "curves_svg",
    "measure_run",
    "run_vector_eval",
    "steered_trace",
    "summarize",
    "token_logprobs",
]


@dataclass
class RunResult:
    """One reply: a voice forced at one strength on one prompt, and what it measured."""

    voice: str
    strength: float
    prompt: int
    token_ids: list[int]
    segments: list[str]  # the steered voice's segment texts
    labels: list[str]  # the classifier's voice for each segment
    p_next: float | None  # P(voice) at the first boundary after the forced block
    nll: float  # sum of -logprob of the block tokens under the unsteered model
    n_tokens: int  # block tokens scored
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The ``--save`` record."""
        return {
            "voice": self.voice,
            "strength": self.strength,
            "prompt": self.prompt,
            "text": self.text,
            "segments": self.segments,
            "labels": self.labels,
            "p_next": self.p_next,
            "nll": round(self.nll, 4),
            "tokens": self.n_tokens,
            "token_ids": self.token_ids,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict` (a ``--save`` line back into a result)."""
        return cls(
            voice=str(d["voice"]),
            strength=float(d["strength"]),
            prompt=int(d["prompt"]),
            token_ids=[int(x) for x in d.get("token_ids", [])],
            segments=[str(x) for x in d.get("segments", [])],
            labels=[str(x) for x in d.get("labels", [])],
            p_next=None if d.get("p_next") is None else float(d["p_next"]),
            nll=float(d.get("nll", 0.0)),
            n_tokens=int(d.get("tokens", 0)),
            text=str(d.get("text", "")),
        )


def token_logprobs(
    backend: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int]
) -> list[float]:
    """Log-probability of each reply token after the prompt under the model with no vector set:
    the reply decoded on sequence 0 in batches after the prompt, a logits row per reply position.

    The prompt's cached prefix is reused (it was decoded before any voice opened, so no vector
    touched it); the reply's cache entries, which a vector did touch, are decoded afresh."""
    from ..backends import logits as L
    from ..backends.base import BackendError
    from ..backends.llamacpp import N_BATCH

    if not hasattr(backend, "_eval_prompt"):
        raise BackendError("scoring token ids needs the llamacpp backend")
    if not reply_ids:
        return []
    ids = list(prompt_ids)
    reply = list(reply_ids)
    with backend._lock:
        if backend._cvec_key:
            backend._set_vector((), None)
        backend._eval_prompt(ids, fresh=False)
        x = np.array(backend._logits(-1), dtype=np.float32)
        out = [float(x[reply[0]]) - L.log_partition(x)]
        pos = len(ids)
        rest = reply[:-1]
        for a in range(0, len(rest), N_BATCH):
            chunk = rest[a : a + N_BATCH]
            backend._decode([(t, pos + a + j, 0, True) for j, t in enumerate(chunk)])
            backend._past.extend(chunk)
            for j in range(len(chunk)):
                row = backend._logits(j)
                out.append(float(row[reply[a + j + 1]]) - L.log_partition(row))
    return out


def steered_trace(
    backend: Any,
    request: GenerationRequest,
    voices: VoiceSet,
    voice: str,
    strength: float,
    vector_dir: str | None,
) -> Trace:
    """One reply with ``voice``'s block forced first and its vector at ``strength`` while it
    speaks (strength 0: no vector)."""
    from ..generate import Generation
    from ..steer import SteerPlan

    plan = SteerPlan(
        next_voice=voice,
        vectors={voice: float(strength)} if strength else {},
        vector_dir=vector_dir,
    )
    trace = Generation(backend, request, voices, steer=plan).run()
    if trace.finish and trace.finish.get("reason") == "error":
        raise RuntimeError(f"generation failed: {trace.finish.get('message')}")
    return trace


def _p_next(trace: Trace, voice: str) -> float | None:
    """P(voice) at the first boundary after the reply start's (None when there is none)."""
    choices = [c for c in trace.voice_choices if c.get("probs")]
    if not choices:
        return None
    first = int(choices[0].get("token") or 0)
    later = [c for c in choices[1:] if int(c.get("token") or 0) > first]
    if not later:
        return None
    p = later[0]["probs"].get(voice)
    return float(p) if isinstance(p, (int, float)) else None


def measure_run(
    backend: Any,
    request: GenerationRequest,
    trace: Trace,
    voice: str,
    strength: float,
    prompt: int,
    clf: VoiceClassifier,
) -> RunResult:
    """The measures of one steered reply (see the module docstring)."""
    segs = [s.text.strip() for s in trace.segments if s.voice == voice and s.text.strip()]
    ids = [int(t.token_id) for t in trace.tokens if t.token_id is not None]
    nll, n = 0.0, 0
    block = [i for i, t in enumerate(trace.tokens) if t.voice == voice and not t.forced]
    if block and len(ids) == len(trace.tokens):
        lps = token_logprobs(backend, backend.prompt_ids(request), ids)
        nll = -sum(lps[i] for i in block)
        n = len(block)
    return RunResult(
        voice=voice,
        strength=float(strength),
        prompt=prompt,
        token_ids=ids,
        segments=segs,
        labels=clf.predict(segs),
        p_next=_p_next(trace, voice),
        nll=nll,
        n_tokens=n,
        text=trace.text,
    )


def _r4(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def choose_default(
    strengths: Sequence[float],
    gains: Sequence[float | None],
    ratios: Sequence[float | None],
    max_ratio: float = MAX_PPL_RATIO,
) -> float:
    """The strength with the largest gain among those with ppl ratio <= ``max_ratio`` (ties:
    the smaller strength; 0.0 when no strength gains)."""
    best, best_gain = 0.0, 0.0
    for s, g, r in sorted(zip(strengths, gains, ratios, strict=True), key=lambda t: t[0]):
        if g is None or r is None or r > max_ratio:
            continue
        if g > best_gain:
            best, best_gain = float(s), g
    return best


def summarize(
    results: Sequence[RunResult],
    voices: Sequence[str],
    strengths: Sequence[float],
    n_prompts: int,
    chance: float | None = None,
) -> dict[str, Any]:
    """The ``--json`` object: curves per voice, default strengths, gains and ppl at them."""
    per_voice: dict[str, Any] = {}
    defaults: dict[str, float] = {}
    order = sorted({float(s) for s in strengths})
    for v in voices:
        share: list[float | None] = []
        pnext: list[float | None] = []
        ppl: list[float | None] = []
        segs: list[int] = []
        bounds: list[int] = []
        toks: list[int] = []
        for s in order:
            rs = [r for r in results if r.voice == v and r.strength == s]
            labels = [lab for r in rs for lab in r.labels]
            share.append(sum(lab == v for lab in labels) / len(labels) if labels else None)
            ps = [r.p_next for r in rs if r.p_next is not None]
            pnext.append(sum(ps) / len(ps) if ps else None)
            n = sum(r.n_tokens for r in rs)
            ppl.append(math.exp(sum(r.nll for r in rs) / n) if n else None)
            segs.append(len(labels))
            bounds.append(len(ps))
            toks.append(n)
        i0 = order.index(0.0) if 0.0 in order else None
        base_share = share[i0] if i0 is not None else None
        base_ppl = ppl[i0] if i0 is not None else None
        gain = [None if x is None or base_share is None else x - base_share for x in share]
        ratio = [None if x is None or not base_ppl else x / base_ppl for x in ppl]
        d = choose_default(order, gain, ratio)
        defaults[v] = d
        k = order.index(d) if d in order else None
        per_voice[v] = {
            "strengths": order,
            "class_share": [_r4(x) for x in share],
            "class_gain": [_r4(x) for x in gain],
            "p_next": [_r4(x) for x in pnext],
            "ppl": [_r4(x) for x in ppl],
            "ppl_ratio": [_r4(x) for x in ratio],
            "segments": segs,
            "boundaries": bounds,
            "tokens": toks,
            "default_strength": d,
            "class_gain_at_default": _r4(gain[k]) if k is not None else None,
            "ppl_ratio_at_default": _r4(ratio[k]) if k is not None else None,
        }
    gains = [g for g in (per_voice[v]["class_gain_at_default"] for v in voices) if g is not None]
    ratios = [r for r in (per_voice[v]["ppl_ratio_at_default"] for v in voices) if r is not None]
    return {
        "n_prompts": n_prompts,
        "strengths": order,
        "voices": list(voices),
        "chance": _r4(chance),
        "max_ppl_ratio": MAX_PPL_RATIO,
        "per_voice": per_voice,
        "default_strength": defaults,
        "mean_class_gain": _r4(sum(gains) / len(gains)) if gains else None,
        "ppl_ratio": _r4(sum(ratios) / len(ratios)) if ratios else None,
    }


@dataclass
class VectorEval:
    """Everything one ``eval vectors`` run needs besides the backend."""

    prompts: list[str]
    voices: VoiceSet
    steered: list[str]
    strengths: list[float] = field(default_factory=lambda: list(STRENGTHS))
    vector_dir: str | None = None
    seed: int = 0
    max_tokens: int = MAX_TOKENS
    temperature: float = 0.7
    top_p: float = 0.95
    voice_prompt: bool = True
    first: int = 0  # index of prompts[0] in the whole prompt file (its seed is seed + first)


def run_vector_eval(
    cfg: VectorEval,
    backend: Any,
    clf: VoiceClassifier,
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Every (voice, strength, prompt) reply of the evaluation, measured; prompt by prompt, so
    the replies seen so far (``on_result``) cover every voice and strength evenly."""
    from ..backends.base import GenerationRequest, Sampling
    from ..conversation import build_messages

    out: list[RunResult] = []
    total = len(cfg.steered) * len(cfg.strengths) * len(cfg.prompts)
    for i, p in enumerate(cfg.prompts, start=cfg.first):
        req = GenerationRequest(
            messages=build_messages(cfg.voices, [("user", p)], voice_prompt=cfg.voice_prompt),
            sampling=Sampling(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=cfg.seed + i,
                max_tokens=cfg.max_tokens,
            ),
            alternatives=0,
        )
        for v in cfg.steered:
            for s in cfg.strengths:
                tr = steered_trace(backend, req, cfg.voices, v, s, cfg.vector_dir)
                out.append(measure_run(backend, req, tr, v, s, i, clf))
                if on_result is not None:
                    on_result(out[-1])
                if progress is not None:
                    progress(len(out), total)
    return out


# ------------------------------------------------------------------------------------ plot

_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")
_FALLBACK = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_PANELS = (
    ("class_share", "classifier share as the voice", (0.0, 1.0)),
    ("p_next", "P(voice) at the next boundary", (0.0, 1.0)),
    ("ppl_ratio", "ppl ratio (unsteered model)", None),
)


def curves_svg(summary: dict[str, Any], colors: dict[str, str] | None = None) -> str:
    """The dose-response curves of a summary as a standalone SVG (three panels, a line per
    voice); names are escaped, colours used only when they are #rrggbb."""
    colors = colors or {}
    voices = list(summary.get("per_voice", {}))
    strengths = [float(s) for s in summary.get("strengths", [])]
    W, H, pad, top, gap = 300, 220, 44, 30, 20
    width = len(_PANELS) * (W + gap) + 140
    height = H + top + 40
    lo_s, hi_s = (min(strengths), max(strengths)) if strengths else (0.0, 1.0)
    span_s = (hi_s - lo_s) or 1.0

    def col(v: str, k: int) -> str:
        c = colors.get(v, "")
        return c if _HEX.match(c) else _FALLBACK[k % len(_FALLBACK)]

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for p, (key, title, fixed) in enumerate(_PANELS):
        x0 = p * (W + gap) + pad
        w = W - pad
        vals = [
            float(y)
            for v in voices
            for y in summary["per_voice"][v].get(key, [])
            if isinstance(y, (int, float))
        ]
        if fixed is not None:
            lo, hi = fixed
        else:
            lo = min([1.0, *vals]) if vals else 0.0
            hi = max([1.0, *vals]) if vals else 2.0
            lo, hi = (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
        span = (hi - lo) or 1.0

        def sx(s: float, x0: int = x0, w: int = w) -> float:
            return x0 + (s - lo_s) / span_s * w

        def sy(y: float, lo: float = lo, span: float = span) -> float:
            return top + H - (y - lo) / span * H

        parts.append(
            f'<rect x="{x0}" y="{top}" width="{w}" height="{H}" fill="none" stroke="#999"/>'
        )
        parts.append(
            f'<text x="{x0 + w / 2:.1f}" y="{top - 10}" text-anchor="middle" '
            f'font-weight="bold">{html.escape(title)}</text>'
        )
        for t in range(5):
            y = lo + span * t / 4
            parts.append(f'<text x="{x0 - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        for s in strengths:
            parts.append(
                f'<text x="{sx(s):.1f}" y="{top + H + 14}" text-anchor="middle">{s:g}</text>'
            )
        parts.append(
            f'<text x="{x0 + w / 2:.1f}" y="{top + H + 30}" text-anchor="middle">strength</text>'
        )
        if key == "ppl_ratio":
            y = summary.get("max_ppl_ratio", MAX_PPL_RATIO)
            if lo <= y <= hi:
                parts.append(
                    f'<line x1="{x0}" x2="{x0 + w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                    'stroke="#999" stroke-dasharray="4 3"/>'
                )
        for k, v in enumerate(voices):
            ys = summary["per_voice"][v].get(key, [])
            pts = [
                (sx(s), sy(float(y)))
                for s, y in zip(strengths, ys, strict=False)
                if isinstance(y, (int, float))
            ]
            if not pts:
                continue
            c = col(v, k)
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.8"/>')
            for a, b in pts:
                parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{c}"/>')
    lx = len(_PANELS) * (W + gap) + 10
    for k, v in enumerate(voices):
        y = top + 10 + 16 * k
        parts.append(
            f'<rect x="{lx}" y="{y - 8}" width="12" height="3" fill="{col(v, k)}"/>'
            f'<text x="{lx + 18}" y="{y - 3}">{html.escape(v)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_plot(summary: dict[str, Any], path: str | Path, voices: VoiceSet | None = None) -> Path:
    """Write :func:`curves_svg` of ``summary`` to ``path`` (voice colours from ``voices``)."""
    colors = {v: voices.color_of(v) for v in summary.get("per_voice", {})} if voices else {}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(curves_svg(summary, colors), encoding="utf-8")
    return p


def elapsed(t0: float) -> float:
    """Seconds since ``t0`` (perf_counter), rounded for the report."""
    return round(time.perf_counter() - t0, 1)


# ------------------------------------------------------------------------------------- CLI


def _floats(spec: str) -> list[float]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            x = float(part)
        except ValueError:
            raise ValueError(part) from None
        if not math.isfinite(x):
            raise ValueError(part)
        out.append(x)
    return out


def add_vectors_parser(sub: Any) -> Any:
    """The ``eval vectors`` subcommand on the eval CLI's subparsers."""
    a = sub.add_parser(
        "vectors",
        help="dose-response of voice vectors on the plain model (character, who-next, fluency)",
        description="For each voice and strength, one reply per prompt from the plain embedded "
        "model with the voice's block forced first and its vector applied while it speaks; "
        "prints the classifier's share of its segments labelled as the voice, the probability "
        "of the voice at the next boundary, and the perplexity of the steered text under the "
        "unsteered model (as a ratio to strength 0), and picks default strengths.",
    )
    a.add_argument("--prompts", default=None, help="prompt file, one a line (default: shipped set)")
    a.add_argument("--n-prompts", type=int, default=None, help="use only the first N prompts")
    a.add_argument(
        "--skip-prompts",
        type=int,
        default=0,
        help="start at prompt K (0-based; seeds stay seed+index: shards of one run)",
    )
    a.add_argument(
        "--summarize",
        nargs="+",
        default=None,
        metavar="SAVED",
        help="generate nothing: the summary (and --plot) of --save files, e.g. shards merged",
    )
    a.add_argument("--vectors", default="seed", help="vector directory or shipped set (seed)")
    a.add_argument("--voices", default="seed", help="voice set (default seed)")
    a.add_argument(
        "--voices-subset", default=None, help="comma-separated voices to steer (default: all)"
    )
    a.add_argument(
        "--strengths",
        default=",".join(f"{s:g}" for s in STRENGTHS),
        help="comma-separated strengths (default 0,0.5,1,1.5,2; 0 is always measured)",
    )
    a.add_argument("--model", default="embedded", help="base GGUF (default: embedded SmolLM2)")
    a.add_argument(
        "--dataset",
        default=None,
        help="training JSONL for the voice classifier (default: the synthetic set the shipped "
        "adapter was trained on)",
    )
    a.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed+i)")
    a.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens per reply (48)")
    a.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    a.add_argument(
        "--no-voice-prompt", action="store_true", help="no voice system prompt before the prompt"
    )
    a.add_argument("--save", default=None, help="write every reply and its measures to JSONL")
    a.add_argument("--plot", default=None, help="write the curves as an SVG to this path")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    return a


def cli_vectors_eval(args: Any) -> int:
    """Run ``eval vectors`` with parsed ``args``; 0 on success, 2 on a user mistake."""
    import json
    import sys

    from ..backends import BackendError, create_backend
    from ..steer import SteerError
    from ..vectors.cvec import VectorFileError
    from ..vectors.sets import load_vector_set
    from ..voices import VoiceSetError, resolve_voice_set
    from . import adherence as A
    from .cli import _fail, _training

    try:
        vs = resolve_voice_set(args.voices)
    except VoiceSetError as e:
        return _fail(str(e))
    if args.summarize:
        return _summarize_saved(args, vs)
    path = Path(args.prompts) if args.prompts else A.default_prompts_path()
    if not path.is_file():
        return _fail(f"{path}: no such file")
    try:
        prompts = A.read_prompts(path)
    except UnicodeDecodeError:
        return _fail(f"{path}: not valid UTF-8")
    if args.skip_prompts < 0:
        return _fail(f"--skip-prompts must be >= 0, got {args.skip_prompts}")
    prompts = prompts[args.skip_prompts :]
    if args.n_prompts is not None:
        if args.n_prompts < 1:
            return _fail(f"--n-prompts must be >= 1, got {args.n_prompts}")
        prompts = prompts[: args.n_prompts]
    if not prompts:
        return _fail(f"{path}: no prompts")
    if args.max_tokens < 1:
        return _fail(f"--max-tokens must be >= 1, got {args.max_tokens}")
    try:
        strengths = _floats(args.strengths)
    except ValueError as e:
        return _fail(f"--strengths: not a number: {e}")
    strengths = sorted({0.0, *strengths})
    if args.dataset is not None and not Path(args.dataset).is_file():
        return _fail(f"{args.dataset}: no such file")
    try:
        vset = load_vector_set(args.vectors)
    except VectorFileError as e:
        return _fail(f"--vectors: {e}")
    if args.voices_subset:
        steered = []
        for name in (x.strip() for x in args.voices_subset.split(",")):
            if not name:
                continue
            v = vs.get(name)
            if v is None:
                return _fail(f"--voices-subset: unknown voice {name!r}")
            steered.append(v.name)
    else:
        steered = [v.name for v in vs.voices]
    missing = [v for v in steered if vset.get(v) is None]
    if args.voices_subset and missing:
        return _fail(f"--voices-subset: no vector for {missing[0]!r} in {vset.path}")
    steered = [v for v in steered if v not in missing]
    if not steered:
        return _fail(f"--vectors: {vset.path} has a vector for none of the voices")
    cfg = VectorEval(
        prompts=prompts,
        voices=vs,
        steered=steered,
        strengths=strengths,
        vector_dir=str(vset.path),
        seed=args.seed,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        voice_prompt=not args.no_voice_prompt,
        first=args.skip_prompts,
    )
    t0 = time.perf_counter()
    save: Any = None
    try:
        clf = A.VoiceClassifier().fit(A.training_segments(_training(args.dataset, args.voices), vs))
        backend = create_backend("llamacpp", model=args.model, n_ctx=2048, seed=args.seed)
    except (BackendError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else repr(e))
    try:

        def progress(i: int, n: int) -> None:
            if i == n or i % max(1, len(strengths)) == 0:
                print(f"reply {i}/{n} ({elapsed(t0):.0f} s)", file=sys.stderr)

        if args.save:
            save = open(args.save, "w", encoding="utf-8")

        def keep(r: RunResult) -> None:
            if save is not None:  # written as they come: a long run killed midway keeps them
                save.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
                save.flush()

        results = run_vector_eval(cfg, backend, clf, progress=progress, on_result=keep)
    except (SteerError, BackendError, VectorFileError, RuntimeError, OSError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else repr(e))
    finally:
        backend.close()
        if save is not None:
            save.close()
    s = summarize(results, steered, strengths, len(prompts), 1 / len(clf.labels))
    s["vectors"] = str(vset.path)
    s["max_tokens"] = args.max_tokens
    s["seconds"] = elapsed(t0)
    return _report(s, args, vs)


def _summarize_saved(args: Any, vs: VoiceSet) -> int:
    """``--summarize``: the summary of saved replies (every file's lines pooled)."""
    import json

    from .cli import _fail

    results: list[RunResult] = []
    for name in args.summarize:
        try:
            # Only "\n" ends a saved line: model text holds U+2028, \x1c and the like, which
            # str.splitlines() would split inside a record (seen on a real run's Pulse replies).
            lines = Path(name).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            return _fail(f"{name}: cannot read: {e}")
        for k, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                results.append(RunResult.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                return _fail(f"{name}:{k}: not a saved reply ({e})")
    if not results:
        return _fail("--summarize: no saved replies")
    voices = list(dict.fromkeys(r.voice for r in results))
    strengths = sorted({0.0, *(r.strength for r in results)})
    n = len({r.prompt for r in results})
    s = summarize(results, voices, strengths, n, 1 / len(vs.voices) if vs.voices else None)
    s["replies"] = len(results)
    return _report(s, args, vs)


def _report(s: dict[str, Any], args: Any, vs: VoiceSet) -> int:
    """Write the plot if asked, then print the summary (JSON or a table)."""
    import json

    if args.plot:
        write_plot(s, args.plot, vs)
    if args.json:
        print(json.dumps(s))
        return 0
    fmt = lambda x: "  n/a" if x is None else f"{x:5.2f}"  # noqa: E731
    print(f"prompts {s['n_prompts']}, vectors {s.get('vectors', '?')}, chance {fmt(s['chance'])}")
    print(f"{'voice':<12} {'strength':>8} {'class':>6} {'gain':>6} {'p_next':>6} {'ppl x':>6}")
    for v, c in s["per_voice"].items():
        for k, st in enumerate(c["strengths"]):
            mark = " *" if st == c["default_strength"] else ""
            print(
                f"{v:<12} {st:8g} {fmt(c['class_share'][k]):>6} {fmt(c['class_gain'][k]):>6} "
                f"{fmt(c['p_next'][k]):>6} {fmt(c['ppl_ratio'][k]):>6}{mark}"
            )
    print(
        f"mean class gain at the defaults (*) {fmt(s['mean_class_gain'])}, "
        f"ppl ratio {fmt(s['ppl_ratio'])}"
    )
    return 0
