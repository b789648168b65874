"""Per-token scores as small pure functions in a named map, per-voice stats, voice transitions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .parse import Segment
from .trace import Alternative, TokenRecord

LN2 = math.log(2)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def probability(tok: TokenRecord) -> float | None:
    """Probability of the chosen token."""
    return math.exp(tok.logprob) if _finite(tok.logprob) else None  # type: ignore[arg-type]


def surprisal(tok: TokenRecord) -> float | None:
    """Surprisal of the chosen token in bits (-log2 p)."""
    return -tok.logprob / LN2 if _finite(tok.logprob) else None  # type: ignore[operator]


def entropy_bounds(
    top_logprobs: Sequence[float], vocab_size: int | None = None
) -> tuple[float, float | None]:
    """Bounds (nats) on the entropy of a distribution known only by its top-k logprobs.

    The unseen tail has mass r = 1 - sum(top), and no unseen token is likelier than the least
    likely listed one (p_min), so the list must really be the top k. The tail's entropy is
    smallest when it is packed into as many tokens of p_min as fit plus one remainder (lower
    bound), and largest when spread evenly over the other V - k tokens (upper bound, needs V).
    """
    probs = [min(math.exp(lp), 1.0) for lp in top_logprobs if _finite(lp)]
    probs = [p for p in probs if p > 0]
    if not probs:
        return 0.0, (math.log(vocab_size) if vocab_size else None)
    head = -sum(p * math.log(p) for p in probs)
    tail = 1.0 - sum(probs)
    if tail <= 1e-12:
        return head, head
    pmin = min(probs)
    full = math.floor(tail / pmin)
    rest = max(0.0, tail - full * pmin)
    lower = head + full * pmin * -math.log(pmin) + (rest * -math.log(rest) if rest > 0 else 0.0)
    upper = None
    if vocab_size and vocab_size > len(probs):
        upper = head + tail * math.log((vocab_size - len(probs)) / tail)
        # Inconsistent inputs (a vocabulary too small for the tail) must not invert the bounds.
        upper = max(upper, lower)
    return lower, upper


def entropy(tok: TokenRecord) -> float | None:
    """Entropy (nats) at this step: exact when the backend had full logits, else the top-k lower
    bound with the tail mass (see :func:`entropy_bounds`)."""
    if _finite(tok.entropy):
        return tok.entropy
    lps = [a.logprob for a in tok.top if _finite(a.logprob)]
    if not lps:
        return None
    return entropy_bounds(lps)[0]  # type: ignore[arg-type]


def margin(tok: TokenRecord) -> float | None:
    """Top-1 minus top-2 probability: how decided the step was."""
    lps = [a.logprob for a in tok.top if a.logprob is not None and math.isfinite(a.logprob)]
    ps = sorted((math.exp(lp) for lp in lps), reverse=True)
    if len(ps) < 2:
        return None
    return ps[0] - ps[1]


def rank(tok: TokenRecord) -> int | None:
    """1-based rank of the chosen token among the alternatives (None when not among them)."""

    def key(a: Alternative) -> float:
        lp = a.logprob
        return -lp if lp is not None and math.isfinite(lp) else math.inf

    ranked = sorted(tok.top, key=key)
    for i, a in enumerate(ranked):
        # Same token id when both are known, else the same text.
        if a.token_id is not None and tok.token_id is not None:
            if a.token_id == tok.token_id:
                return i + 1
        elif a.text == tok.text:
            return i + 1
    return None


TOKEN_METRICS: dict[str, Callable[[TokenRecord], float | int | None]] = {
    "probability": probability,
    "surprisal": surprisal,
    "entropy": entropy,
    "margin": margin,
    "rank": rank,
}


@dataclass(frozen=True)
class VoiceStats:
    """Aggregates for one voice."""

    voice: str
    tokens: int
    mean_logprob: float | None
    perplexity: float | None
    mean_entropy: float | None

    def to_dict(self) -> dict[str, object]:
        """Plain mapping."""
        return {
            "voice": self.voice,
            "tokens": self.tokens,
            "mean_logprob": self.mean_logprob,
            "perplexity": self.perplexity,
            "mean_entropy": self.mean_entropy,
        }


def voice_stats(tokens: Iterable[TokenRecord]) -> list[VoiceStats]:
    """Tokens, mean logprob, perplexity and mean entropy per voice, in first-seen order."""
    acc: dict[str, list[list[float]]] = {}
    counts: dict[str, int] = {}
    for t in tokens:
        v = t.voice or "?"
        counts[v] = counts.get(v, 0) + 1
        lp, ent = acc.setdefault(v, [[], []])
        if _finite(t.logprob):
            lp.append(t.logprob)  # type: ignore[arg-type]
        e = entropy(t)
        if e is not None:
            ent.append(e)
    out = []
    for v, (lp, ent) in acc.items():
        mean_lp = sum(lp) / len(lp) if lp else None
        out.append(
            VoiceStats(
                voice=v,
                tokens=counts[v],
                mean_logprob=mean_lp,
                perplexity=math.exp(-mean_lp) if mean_lp is not None else None,
                mean_entropy=sum(ent) / len(ent) if ent else None,
            )
        )
    return out


def transition_matrix(
    segments: Iterable[Segment], skip_blank: bool = True
) -> tuple[list[str], list[list[int]]]:
    """Counts of voice A followed by voice B over consecutive (non-blank) segments."""
    order: list[str] = []
    seq: list[str] = []
    for s in segments:
        if skip_blank and not s.text:
            continue
        if s.voice not in order:
            order.append(s.voice)
        seq.append(s.voice)
    idx = {v: i for i, v in enumerate(order)}
    m = [[0] * len(order) for _ in order]
    for a, b in itertools.pairwise(seq):
        m[idx[a]][idx[b]] += 1
    return order, m


def model_transition_matrix(
    choices: Iterable[dict[str, object]], order: Sequence[str] | None = None
) -> tuple[list[str], list[list[float]]]:
    """The model's own voice transitions: at each boundary after a block of voice A (the
    previous boundary's chosen voice), its who-speaks-next probabilities of every voice B,
    averaged per A. Rows are "from", columns "to"; a row with no boundary stays zeros. The
    reply-start boundary (no voice before it) is left out. Compare with
    :func:`transition_matrix` of the segments: what the model wanted vs what was said."""
    rows: dict[str, list[dict[str, float]]] = {}
    names: list[str] = list(order or [])
    prev: str | None = None
    for c in choices:
        probs = c.get("probs")
        chosen = c.get("chosen")
        if isinstance(probs, dict):
            for v in probs:
                if v not in names:
                    names.append(str(v))
            if prev is not None:
                rows.setdefault(prev, []).append(
                    {str(k): float(p) for k, p in probs.items() if isinstance(p, (int, float))}
                )
        if isinstance(chosen, str):
            if chosen not in names:
                names.append(chosen)
            prev = chosen
    m = [[0.0] * len(names) for _ in names]
    for a, dists in rows.items():
        i = names.index(a)
        for j, b in enumerate(names):
            m[i][j] = sum(d.get(b, 0.0) for d in dists) / len(dists)
    return names, m
