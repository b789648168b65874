"""Metrics: entropy bounds hold on random distributions, exact small cases, stats, transitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thoughtform.metrics import (
    TOKEN_METRICS,
    entropy,
    entropy_bounds,
    margin,
    probability,
    rank,
    surprisal,
    transition_matrix,
    voice_stats,
)
from thoughtform.parse import Segment, parse_text
from thoughtform.trace import Alternative, TokenRecord

LN2 = math.log(2)


def true_entropy(p: np.ndarray) -> float:
    """Entropy in nats of a full distribution."""
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def top_logprobs(p: np.ndarray, k: int) -> list[float]:
    """The k largest logprobs of ``p``."""
    return [math.log(x) for x in sorted(p, reverse=True)[:k] if x > 0]


def check_bounds(p: np.ndarray, k: int) -> None:
    """lower <= H <= upper for the top-k view of ``p``."""
    h = true_entropy(p)
    lower, upper = entropy_bounds(top_logprobs(p, k), len(p))
    assert upper is not None
    assert lower <= h + 1e-9, (lower, h)
    assert h <= upper + 1e-9, (h, upper)
    assert upper <= math.log(len(p)) + 1e-9


def test_bounds_hold_on_many_random_distributions() -> None:
    rng = np.random.default_rng(7)
    for _ in range(3000):
        v = int(rng.integers(2, 300))
        # Dirichlet concentrations from very peaked to nearly uniform.
        alpha = float(10 ** rng.uniform(-2.5, 1.5))
        p = rng.dirichlet(np.full(v, alpha))
        check_bounds(p, int(rng.integers(1, min(v, 20) + 1)))


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=60).filter(
        lambda w: sum(w) > 0
    ),
    k=st.integers(1, 60),
)
def test_bounds_hold_on_arbitrary_distributions(weights: list[float], k: int) -> None:
    p = np.array(weights) / sum(weights)
    check_bounds(p, min(k, len(p)))


def test_bounds_exact_small_cases() -> None:
    # p = (1/2, 1/4, ?, ?) over 4 tokens: the tail 1/4 is one token of 1/4 (H = 1.5 bits) at
    # least, and two of 1/8 (H = 1.75 bits) at most.
    lower, upper = entropy_bounds([math.log(0.5), math.log(0.25)], 4)
    assert lower == pytest.approx(1.5 * LN2) and upper == pytest.approx(1.75 * LN2)
    # Both bounds are attained by real distributions.
    assert true_entropy(np.array([0.5, 0.25, 0.25, 0])) == pytest.approx(lower)
    assert true_entropy(np.array([0.5, 0.25, 0.125, 0.125])) == pytest.approx(upper)
    # The whole distribution listed: exact.
    assert entropy_bounds([math.log(0.5)] * 2, 2) == pytest.approx((LN2, LN2))
    assert entropy_bounds([0.0]) == (0.0, 0.0)
    # Tail 0.5 with p_min 0.2: at least two tokens of 0.2 and one of 0.1.
    lower, upper = entropy_bounds([math.log(0.3), math.log(0.2)], None)
    want = -(0.3 * math.log(0.3) + 3 * 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert lower == pytest.approx(want) and upper is None
    # Nothing known: 0 and log V.
    assert entropy_bounds([], 8) == (0.0, pytest.approx(math.log(8)))
    assert entropy_bounds([math.nan, -math.inf], None) == (0.0, None)
    # Rounding that makes the top sum a hair above 1 is no tail at all.
    lo, up = entropy_bounds([math.log(0.6), math.log(0.4000001)], 10)
    assert lo == up


def test_bounds_never_invert_on_inconsistent_input() -> None:
    # Tail 0.8 but only one unseen token allowed: impossible, still lower <= upper.
    lower, upper = entropy_bounds([math.log(0.1), math.log(0.1)], 3)
    assert upper is not None and lower <= upper


def tok(**kw: object) -> TokenRecord:
    """A token record with defaults."""
    return TokenRecord(**{"index": 0, "text": "a", **kw})  # type: ignore[arg-type]


def test_token_metrics_exact() -> None:
    t = tok(
        logprob=math.log(0.25),
        token_id=2,
        top=[Alternative("b", math.log(0.5), 1), Alternative("a", math.log(0.25), 2)],
    )
    assert probability(t) == pytest.approx(0.25)
    assert surprisal(t) == pytest.approx(2.0)
    assert margin(t) == pytest.approx(0.25)
    assert rank(t) == 2
    assert entropy(t) == pytest.approx(1.5 * LN2)  # lower bound: tail 1/4 as one token
    assert entropy(tok(entropy=0.7, top=t.top)) == 0.7  # exact entropy wins
    assert set(TOKEN_METRICS) == {"probability", "surprisal", "entropy", "margin", "rank"}
    assert TOKEN_METRICS["surprisal"](t) == surprisal(t)


def test_token_metrics_without_data() -> None:
    bare = tok()
    for name, fn in TOKEN_METRICS.items():
        assert fn(bare) is None, name
    nan = tok(logprob=math.nan, top=[Alternative("a", math.nan)])
    assert probability(nan) is None and surprisal(nan) is None and entropy(nan) is None
    assert margin(tok(top=[Alternative("a", -1.0)])) is None


def test_rank_edge_cases() -> None:
    # Regression: a logprob of exactly 0.0 used to sort last (0.0 is falsy).
    t = tok(text="a", top=[Alternative("b", -3.0), Alternative("a", 0.0)])
    assert rank(t) == 1
    # Unknown logprobs sort last; matching falls back to text when an id is missing.
    t2 = tok(text="x", token_id=5, top=[Alternative("y", None), Alternative("x", -1.0)])
    assert rank(t2) == 1
    t3 = tok(text="x", token_id=5, top=[Alternative("x", -1.0, 6)])
    assert rank(t3) is None  # same text, different token id: not the chosen token
    assert rank(tok(text="zzz", top=[Alternative("x", -1.0)])) is None


def test_voice_stats_numbers() -> None:
    tokens = [
        tok(index=0, voice="Echo", logprob=math.log(0.5), entropy=1.0),
        tok(index=1, voice="main", logprob=math.log(0.25), entropy=0.5),
        tok(index=2, voice="Echo", logprob=math.log(0.125), entropy=2.0),
        tok(index=3, voice="Echo", logprob=None, entropy=None),
        tok(index=4, voice=None, logprob=-1.0),
    ]
    stats = {s.voice: s for s in voice_stats(tokens)}
    assert list(stats) == ["Echo", "main", "?"]
    echo = stats["Echo"]
    assert echo.tokens == 3
    assert echo.mean_logprob == pytest.approx(2 * math.log(0.25) / 2)  # mean of ln(1/2), ln(1/8)
    assert echo.perplexity == pytest.approx(4.0)
    assert echo.mean_entropy == pytest.approx(1.5)
    assert stats["main"].perplexity == pytest.approx(4.0)
    q = stats["?"]
    assert (q.tokens, q.mean_entropy, q.perplexity) == (1, None, pytest.approx(math.e))
    assert echo.to_dict()["tokens"] == 3
    assert voice_stats([]) == []


def test_transition_matrix() -> None:
    text = "a\n[Echo] b\n[Doubt] c\n[Echo] d\n[Echo]\n[Doubt] e [/Doubt] f"
    order, m = transition_matrix(parse_text(text, "seed"))
    assert order == ["main", "Echo", "Doubt"]
    # main->Echo, Echo->Doubt, Doubt->Echo, Echo->Doubt (the blank Echo is skipped), Doubt->main
    assert m == [[0, 1, 0], [0, 0, 2], [1, 1, 0]]
    order2, m2 = transition_matrix(parse_text(text, "seed"), skip_blank=False)
    assert order2 == order and m2[1][1] == 1 and m2[1][2] == 2
    assert transition_matrix([]) == ([], [])
    assert transition_matrix([Segment("Echo", "x", 0, 1)]) == (["Echo"], [[0]])


def test_model_transition_matrix_averages_boundaries_after_each_voice() -> None:
    from thoughtform.metrics import model_transition_matrix

    choices = [
        {"token": 0, "probs": {"A": 0.5, "B": 0.3}, "chosen": "A"},
        {"token": 9, "probs": {"A": 0.1, "B": 0.6}, "chosen": "B"},
        {"token": 20, "probs": {"A": 0.4, "B": 0.2}, "chosen": "A"},
        {"token": 31, "probs": {"A": 0.3, "B": 0.4}, "chosen": None},
    ]
    names, m = model_transition_matrix(choices)
    assert names == ["A", "B"]
    assert m[0] == pytest.approx([(0.1 + 0.3) / 2, (0.6 + 0.4) / 2])  # after A: two boundaries
    assert m[1] == pytest.approx([0.4, 0.2])  # after B: one
    assert model_transition_matrix([]) == ([], [])
