"""Resonance: how much each council turn draws on each earlier turn. Pure functions over the
turns (and tokens) of a council trace; every measure returns :data:`Scores`, ``scores[j][i]`` for
turn ``j`` and an earlier turn ``i``, which :func:`voice_matrix` aggregates voice x voice.

* **echo** (:func:`echo_scores`, any backend, from the text alone). A turn's *units* are its
  content words (:func:`thoughtform.evaluate.adherence.content_words`' rule: stop words and words
  under 3 letters dropped, the rest stemmed) and its phrases (two adjacent words of the text that
  are both content words with only spaces between them, e.g. "sky blue"). Each unit is credited
  to the turn that used it first (the user's messages included). ``echo[j][i]`` is the fraction
  of turn ``j``'s units first used by turn ``i`` (0 for an earlier turn it took nothing from): a
  turn's scores sum to at most 1, the rest being what it brought itself.
* **attention** (:func:`attention_scores`, transformers backend). For each generated token of turn
  ``j``, the attention weight of its top source positions (the per-token
  :class:`~thoughtform.trace.AttentionSummary`, head-averaged) that falls on turn ``i``'s token
  span in ``j``'s prompt (recorded on the turn as ``context``), averaged over the chosen layers
  and over the tokens. Only the top positions are kept per token, so this is a lower bound of
  the true mass, comparable between turns.
* **counterfactual** (:func:`counterfactual_scores`, llama.cpp or transformers). The shift in the
  model's mean surprisal (nats per token) of turn ``j``'s text when turn ``i`` is removed from its
  context: positive when ``i`` made ``j`` more expected. Computed on demand through a surprisal
  function (:func:`thoughtform.council.surprisal_fn`) and cached.

:func:`arcs` turns any measure's scores into the arcs the workbench draws between lanes (per turn,
the earlier turns it draws on above a small threshold); :func:`council_scores` picks a measure for
a running or finished :class:`~thoughtform.council.Council`, and says in one line
(:class:`MeasureUnavailable`) when its backend cannot give it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from .council import USER, Council, Turn, continuation_scorer, surprisal_fn, wants_persona
from .evaluate.adherence import STOP_WORDS, stem
from .trace import AttentionSummary, Trace

__all__ = [
    "ARC_THRESHOLD",
    "ARC_THRESHOLDS",
    "MEASURES",
    "UNITS",
    "USER",
    "Arc",
    "MeasureUnavailable",
    "Scores",
    "SurprisalFn",
    "VoiceMatrix",
    "arcs",
    "attention_scores",
    "council_scores",
    "counterfactual_scores",
    "echo_scores",
    "text_units",
    "voice_matrix",
]

# scores[j][i]: how much turn j draws on earlier turn i
Scores = dict[int, dict[int, float]]
# surprisal(j, removed) -> mean surprisal (nats/token) of turn j's text without turns `removed`
SurprisalFn = Callable[[int, frozenset[int]], float]

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def text_units(text: str) -> set[str]:
    """The content words (stemmed) of ``text`` and its phrases ("a b": two adjacent words of
    the text that are both content words)."""
    text = text.replace("’", "'")
    found = list(_WORD.finditer(text))
    stems = [
        None if (w in STOP_WORDS or len(w) < 3) else stem(w)
        for w in (m.group(0).casefold() for m in found)
    ]
    units = {s for s in stems if s}
    for (ma, a), (mb, b) in pairwise(zip(found, stems, strict=True)):
        # adjacent: nothing but spaces between them (a phrase never spans punctuation)
        if a and b and not text[ma.end() : mb.start()].strip():
            units.add(f"{a} {b}")
    return units


def echo_scores(turns: Sequence[Turn]) -> Scores:
    """The echo measure (see the module docstring) for every turn after the first."""
    first: dict[str, int] = {}
    out: Scores = {}
    for t in turns:
        units = text_units(t.text)
        if t.voice is not None and units:
            credit: dict[int, float] = {}
            for u in units:
                src = first.get(u)
                if src is not None:
                    credit[src] = credit.get(src, 0.0) + 1.0
            out[t.index] = {
                e.index: credit.get(e.index, 0.0) / len(units) for e in turns if e.index < t.index
            }
        for u in units:
            first.setdefault(u, t.index)
    return out


def attention_scores(
    trace: Trace, turns: Sequence[Turn], layers: tuple[int, int] | None = None
) -> Scores:
    """The attention measure (see the module docstring); ``layers`` is a [first, end) range
    (default: all). Turns without recorded spans or attention are left out."""
    by_turn: dict[int, list[AttentionSummary]] = {}
    for tok in trace.tokens:
        if tok.turn is not None and tok.attention is not None:
            by_turn.setdefault(tok.turn, []).append(tok.attention)
    out: Scores = {}
    for t in turns:
        summaries = by_turn.get(t.index)
        if not t.context or not summaries:
            continue
        spans = [(int(i), int(a), int(b)) for i, a, b in t.context]
        total = {i: 0.0 for i, _, _ in spans}
        for att in summaries:
            rows = att.top if layers is None else att.top[layers[0] : layers[1]]
            if not rows:
                continue
            for i, a, b in spans:
                m = sum(w for row in rows for p, w in row if a <= p < b and w == w)
                total[i] += m / len(rows)
        out[t.index] = {i: m / len(summaries) for i, m in sorted(total.items())}
    return out


def counterfactual_scores(
    turns: Sequence[Turn],
    surprisal: SurprisalFn,
    cache: MutableMapping[tuple[int, frozenset[int]], float] | None = None,
    pairs: Iterable[tuple[int, int]] | None = None,
) -> Scores:
    """The counterfactual measure (see the module docstring) for ``pairs`` (turn j, earlier
    turn i; default: every voice turn against every earlier turn). Surprisals are memoised in
    ``cache`` (pass the same mapping again to reuse them)."""
    memo: MutableMapping[tuple[int, frozenset[int]], float] = {} if cache is None else cache

    def s(j: int, removed: frozenset[int]) -> float:
        key = (j, removed)
        if key not in memo:
            memo[key] = float(surprisal(j, removed))
        return memo[key]

    if pairs is None:
        pairs = [
            (t.index, e.index)
            for t in turns
            if t.voice is not None and t.text
            for e in turns
            if e.index < t.index and e.text
        ]
    out: Scores = {}
    for j, i in pairs:
        out.setdefault(j, {})[i] = s(j, frozenset({i})) - s(j, frozenset())
    return {j: dict(sorted(v.items())) for j, v in sorted(out.items())}


@dataclass(frozen=True)
class VoiceMatrix:
    """Voice x voice resonance: ``values[r][c]`` is the mean score of turns by ``labels[r]`` on
    earlier turns by ``labels[c]`` (None where no such pair exists), over ``counts[r][c]`` pairs."""

    labels: tuple[str, ...]
    values: tuple[tuple[float | None, ...], ...]
    counts: tuple[tuple[int, ...], ...]

    def get(self, speaker: str, source: str) -> float | None:
        """The score of ``speaker``'s turns on ``source``'s turns."""
        return self.values[self.labels.index(speaker)][self.labels.index(source)]

    def to_dict(self) -> dict[str, object]:
        """Plain mapping (JSON, the workbench)."""
        return {
            "labels": list(self.labels),
            "values": [[None if v is None else round(v, 4) for v in row] for row in self.values],
            "counts": [list(r) for r in self.counts],
        }


def voice_matrix(
    turns: Sequence[Turn], scores: Scores, labels: Sequence[str] | None = None
) -> VoiceMatrix:
    """Aggregate per-turn scores voice x voice (the user as themself is :data:`USER`); labels
    default to the speakers in order of first appearance."""
    speaker = {t.index: t.speaker for t in turns}
    if labels is None:
        seen: list[str] = []
        for t in turns:
            if t.speaker not in seen:
                seen.append(t.speaker)
        labels = seen
    pos = {v: k for k, v in enumerate(labels)}
    n = len(labels)
    sums = [[0.0] * n for _ in range(n)]
    counts = [[0] * n for _ in range(n)]
    for j, row in scores.items():
        r = pos.get(speaker.get(j, ""))
        if r is None:
            continue
        for i, v in row.items():
            c = pos.get(speaker.get(i, ""))
            if c is None:
                continue
            sums[r][c] += v
            counts[r][c] += 1
    values = tuple(
        tuple(sums[r][c] / counts[r][c] if counts[r][c] else None for c in range(n))
        for r in range(n)
    )
    return VoiceMatrix(tuple(labels), values, tuple(tuple(r) for r in counts))


# ------------------------------------------------------------------------ arcs and measures

MEASURES = ("echo", "attention", "counterfactual")
#: What a score of each measure counts (the arcs' titles and the matrix's caption).
UNITS = {"echo": "share", "attention": "attention mass", "counterfactual": "nats/token"}
#: Arcs below this weight are not drawn: on the replay fixtures' four-turn councils an echo
#: under 5% is one shared word in twenty, noise next to the real take-ups (25-75%).
ARC_THRESHOLD = 0.05
#: Per measure. Attention keeps only each token's top source positions and most of a small
#: model's mass sits on the first tokens: on the embedded SmolLM2 (10-token turns,
#: tests/test_council_transformers.py) a turn's mass on an earlier turn measured 0.004-0.02.
ARC_THRESHOLDS = {"echo": ARC_THRESHOLD, "attention": 0.002, "counterfactual": ARC_THRESHOLD}
# A turn is scored by the counterfactual measure only once it is over (its text is final).
_FINISHED = ("stop", "length", "cut")


class MeasureUnavailable(ValueError):
    """A resonance measure this council's backend cannot give (the message says why, in a line)."""


@dataclass(frozen=True)
class Arc:
    """Turn ``turn`` draws on the earlier turn ``source`` with ``weight`` (in the measure's unit)."""

    turn: int
    source: int
    weight: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain mapping (the workbench): ``{"to": turn, "from": source, "w": weight}``."""
        return {"to": self.turn, "from": self.source, "w": round(self.weight, 4)}


def arcs(scores: Scores, threshold: float = ARC_THRESHOLD) -> list[Arc]:
    """Per turn (in order), the earlier turns it draws on with a weight of at least
    ``threshold``, strongest first; negative (a counterfactual turn made *less* expected) and
    non-finite weights, and pairs that are not earlier-to-later, are left out."""
    out: list[Arc] = []
    for j in sorted(scores):
        row = [
            Arc(j, i, float(w))
            for i, w in scores[j].items()
            if i < j and w == w and abs(w) != float("inf") and w >= threshold
        ]
        out += sorted(row, key=lambda a: (-a.weight, a.source))
    return out


def _tokenize_of(backend: object) -> Callable[[str], Sequence[int]] | None:
    """How to count a text's tokens on ``backend`` (llama.cpp's own, a transformers tokenizer)."""
    own = getattr(backend, "tokenize", None)
    if callable(own):
        return own
    tok = getattr(backend, "tokenizer", None)
    if tok is None:
        return None
    return lambda text: list(tok(text, add_special_tokens=False)["input_ids"])


def council_scores(
    council: Council,
    measure: str,
    cache: MutableMapping[tuple[int, frozenset[int]], float] | None = None,
    compute: bool = True,
) -> Scores:
    """The scores of ``measure`` (one of :data:`MEASURES`) over ``council``'s turns so far.

    ``counterfactual`` scores finished turns only, each through its speaker's backend, memoised
    in ``cache`` (keyed by turn and removed turns: turns are only ever appended, so an entry stays
    true); with ``compute`` False it uses the cache alone (while a turn streams the backend is
    busy generating). Raises :class:`MeasureUnavailable` when the backend cannot give it."""
    turns = list(council.turns)
    if measure == "echo":
        return echo_scores(turns)
    backends = {m: council.backend_for(m) for m in council.members}
    names = sorted({str(getattr(b, "name", "?")) for b in backends.values()})
    if measure == "attention":
        scores = attention_scores(council.trace, turns)
        if scores:
            return scores
        capable = [
            b
            for b in backends.values()
            if getattr(getattr(b, "capabilities", None), "attention", False)
        ]
        if not capable:
            raise MeasureUnavailable(
                f"attention: needs the transformers backend (this council runs on "
                f"{', '.join(names)})"
            )
        if any(t.voice is not None and t.source == "model" and t.finish for t in turns):
            raise MeasureUnavailable("attention: this council's turns recorded no attention")
        return {}
    if measure != "counterfactual":
        raise MeasureUnavailable(f"unknown measure {measure!r} (choose {', '.join(MEASURES)})")
    scorers = {v: continuation_scorer(b) for v, b in backends.items()}
    if not any(scorers.values()):
        raise MeasureUnavailable(
            f"counterfactual: backend {', '.join(names)} cannot score text (use llamacpp or "
            "transformers)"
        )
    memo: MutableMapping[tuple[int, frozenset[int]], float] = {} if cache is None else cache
    fns: dict[str, SurprisalFn] = {}
    for v, sc in scorers.items():
        if sc is not None:
            b = backends[v]
            fns[v] = surprisal_fn(
                council.voices,
                council.members,
                turns,
                sc,
                _tokenize_of(b),
                council.system,
                persona=wants_persona(b),
            )
    speaker = {t.index: t.voice for t in turns}

    def surprisal(j: int, removed: frozenset[int]) -> float:
        return fns[speaker[j] or ""](j, removed)

    pairs = [
        (t.index, e.index)
        for t in turns
        if t.voice in fns and t.source == "model" and t.text and t.finish in _FINISHED
        for e in turns
        if e.index < t.index and e.text
    ]
    if not compute:
        pairs = [
            (j, i) for j, i in pairs if (j, frozenset()) in memo and (j, frozenset({i})) in memo
        ]
    return counterfactual_scores(turns, surprisal, memo, pairs)
