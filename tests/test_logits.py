"""The per-step arithmetic the owned decode loops share (backends/logits.py), against plain
float64 references: top-k selection, log-partition and entropy, and sampling with temperature,
top-k and top-p drawing from exactly the truncated distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thoughtform.backends import logits as L


def ref_top(x: np.ndarray, k: int) -> list[int]:
    """Largest first, ties by lower index, finite values only."""
    finite = [i for i in range(len(x)) if math.isfinite(float(x[i]))]
    return sorted(finite, key=lambda i: (-float(x[i]), i))[:k]


def ref_dist(x: np.ndarray, t: float, top_p: float, top_k: int) -> dict[int, float]:
    """The distribution sampling should follow: temperature, then top-k, then top-p (a token is
    kept while the mass before it is below top_p), renormalised."""
    order = ref_top(x, len(x))
    if 0 < top_k < len(x):
        order = order[:top_k]
    w = np.array([math.exp((float(x[i]) - float(x[order[0]])) / t) for i in order])
    p = w / w.sum()
    if top_k == 0 or top_k >= len(x):
        full = np.exp((x.astype(np.float64) - float(x.max())) / t)
        p = w / full.sum()
    keep = max(1, int(np.count_nonzero(np.cumsum(p) - p < top_p)))
    kept = w[:keep] / w[:keep].sum()
    return {order[j]: float(kept[j]) for j in range(keep)}


@pytest.mark.parametrize("seed", range(6))
def test_top_indices_matches_a_full_sort(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    x = (rng.standard_normal(n) * rng.uniform(0.1, 20)).astype(np.float32)
    if seed % 2:
        x = np.round(x)  # many ties
    if seed % 3 == 0:
        x[rng.random(n) < 0.7] = -np.inf  # a mask banned most of the vocabulary
    for k in (0, 1, 10, 256, n, n + 5):
        got = L.top_indices(x, k).tolist()
        assert got == ref_top(x, k), (seed, k)


def test_top_indices_with_every_value_banned_or_far_below() -> None:
    x = np.full(100, -np.inf, dtype=np.float32)
    assert L.top_indices(x, 5).tolist() == []
    x[7] = 0.0
    x[3] = -1e6  # far below the maximum: found by widening the margin
    assert L.top_indices(x, 5).tolist() == [7, 3]


def test_summarize_log_partition_and_entropy() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(5000) * 4).astype(np.float32)
    log_z, entropy, top = L.summarize(x, 10)
    xd = x.astype(np.float64)
    ref_z = float(np.log(np.exp(xd - xd.max()).sum()) + xd.max())
    p = np.exp(xd - ref_z)
    assert log_z == pytest.approx(ref_z, abs=1e-4)
    assert entropy == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-3)
    assert top is not None and top.tolist() == ref_top(x, 10)
    assert L.summarize(x, 0)[2] is None
    assert L.log_partition(x) == pytest.approx(ref_z, abs=1e-4)


@pytest.mark.parametrize(
    ("n", "t", "top_p", "top_k"),
    [
        (40, 0.7, 0.9, 5),  # top-k and top-p together
        (40, 1.3, 1.0, 8),  # top-k only
        (40, 1.0, 0.6, 0),  # top-p only
        (40, 0.9, 1.0, 0),  # plain temperature
        (2000, 3.0, 0.95, 0),  # flat: the nucleus is wider than the candidates taken first
        (2000, 1.0, 0.95, 600),  # top-k wider than the candidates taken first
    ],
)
def test_sample_draws_from_the_truncated_distribution(
    n: int, t: float, top_p: float, top_k: int
) -> None:
    rng = np.random.default_rng(n + top_k)
    x = (rng.standard_normal(n) * 2).astype(np.float32)
    want = ref_dist(x, t, top_p, top_k)
    draws = 20_000
    counts: dict[int, int] = {}
    gen = np.random.default_rng(0)
    for _ in range(draws):
        tok, lp = L.sample(x, t, top_p, top_k, gen)
        assert tok in want, tok  # never a token outside the truncation
        assert lp == pytest.approx(math.log(want[tok]), abs=1e-3)
        counts[tok] = counts.get(tok, 0) + 1
    # Total variation over rank bins (at most 20), so that sampling noise stays ~0.01 even
    # when the nucleus holds a thousand tokens.
    ranked = sorted(want, key=lambda i: -want[i])
    bins = min(20, len(ranked))
    tv = 0.0
    for b in range(bins):
        group = ranked[b * len(ranked) // bins : (b + 1) * len(ranked) // bins]
        tv += abs(sum(counts.get(i, 0) for i in group) / draws - sum(want[i] for i in group))
    assert tv / 2 < 0.02


def test_sample_greedy_and_banned_tokens() -> None:
    x = np.array([0.0, 3.0, 2.9, -np.inf, 1.0], dtype=np.float32)
    assert L.sample(x, 0.0, 1.0, 0, np.random.default_rng(0)) == (1, 0.0)
    x[1] = -np.inf  # banned by a mask
    got = {L.sample(x, 1.0, 0.9, 3, np.random.default_rng(s))[0] for s in range(200)}
    assert got <= {0, 2, 4} and 2 in got


@pytest.mark.parametrize("top_k", [0, 5, 40, 300])
def test_sample_with_the_summary_ranking_draws_the_same_tokens(top_k: int) -> None:
    """The decode loop passes summarize's ranking to the sampler instead of a second scan."""
    rng = np.random.default_rng(top_k)
    x = (rng.standard_normal(3000) * 2.5).astype(np.float32)
    ranked = L.summarize(x, max(10, L.candidates(top_k)))[2]
    assert ranked is not None and ranked.shape[0] == max(10, L.candidates(top_k))
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(300):
        assert L.sample(x, 0.8, 0.95, top_k, a) == L.sample(x, 0.8, 0.95, top_k, b, ranked=ranked)
