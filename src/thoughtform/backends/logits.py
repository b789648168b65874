"""Per-step arithmetic on a vocabulary's logits, shared by the backends that see them.

Each step works in float32 on the full vocabulary (49,152 for SmolLM2) once: the log-partition
and exact entropy without materialising the log-softmax (H = log Z - E_p[x]), the top-k by a
threshold scan (:func:`top_indices`), and sampling that sorts only the few hundred candidates
top-p keeps. :func:`scan` does the first two in one compiled pass (``_scan.c``, built by the
install where a C compiler is present); the numpy path is the same arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

try:  # the compiled pass (setup.py builds it; optional: the numpy path below stands in)
    from . import _scan
except ImportError:  # pragma: no cover - an install without a C compiler
    _scan = None  # type: ignore[assignment]

# Candidates taken before top-p (widened when they hold less than top_p of the mass). Measured
# on 400 steps of the embedded model at temperature 0.7 / top-p 0.95: the nucleus is 2 tokens
# at the median, 38 at the 90th percentile, over 64 at 3% of steps.
NUCLEUS_CANDIDATES = 64


# First margin below the maximum logit the top-k scan tries, and its growth until it holds k
# tokens. Measured on 400 steps of SmolLM2's logits: 8 nats holds the top 10 in one pass, and 31
# tokens at the median (549 at the 90th percentile, 2,429 within 16 nats); growing x1.5 keeps
# the partitioned set near k: a top-40 took 64 us on average against 99-134 us doubling (x4
# reached 32 nats, most of the vocabulary, a 270 us partition).
_MARGIN = 8.0
_GROWTH = 1.5
# Candidates up to this many are sorted whole; more are partitioned at the k-th first. Measured
# right after a decode (cold caches, where each numpy call costs 2-5x its warm time): the few
# calls of one sort beat the partition's eight on the few hundred the scan leaves.
_SORT_ALL = 512


def kernel() -> str:
    """Which code makes :func:`scan`'s pass: ``avx2``, ``plain`` (compiled, no SIMD) or
    ``numpy`` (the extension is not built)."""
    return _scan.kernel() if _scan is not None else "numpy"


def top_indices(x: np.ndarray, k: int, m: float | None = None) -> np.ndarray:
    """The indices of the ``k`` largest finite values of ``x``, largest first (ties: lower
    index first).

    A comparison against ``max - margin`` finds a small superset (9 us over 49,152 logits),
    and only that is partitioned: ``argpartition`` over the whole vocabulary cost 370 us a
    call here, twice a token, a tenth of a decode step on the embedded model. ``m``: x's
    maximum, when the caller has it."""
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    m = float(x.max()) if m is None else m
    if not math.isfinite(m):
        idx = np.flatnonzero(np.isfinite(x))
    else:
        margin = _MARGIN
        while True:
            idx = np.flatnonzero(x >= m - margin)
            if idx.shape[0] >= k or margin > 1e4:
                break
            margin *= _GROWTH
        if idx.shape[0] < k:  # fewer finite values than k (a mask banned the rest)
            idx = np.flatnonzero(np.isfinite(x))
    return _rank(x, idx, k)


def _rank(x: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest of ``x`` among the candidates ``idx`` (ascending ids, at least ``k``
    unless fewer are finite), largest first, ties by lower id."""
    v = x[idx]
    if idx.shape[0] > max(k, _SORT_ALL):
        # Everything above the k-th value, then ties at it by lower index (argpartition alone
        # would pick among ties arbitrarily).
        kth = float(-np.partition(-v, k - 1)[k - 1])
        above = idx[v > kth]
        idx = np.concatenate([above, idx[v == kth][: k - above.shape[0]]])
        v = x[idx]
    # A stable sort of the candidates (ascending ids): ties stay by lower index.
    return idx[np.argsort(-v, kind="stable")[:k]]


def scan(x: np.ndarray, k: int, buf: np.ndarray) -> tuple[float, float, float, np.ndarray | None]:
    """``(max, log_z, entropy, top)`` of one step's raw float32 logits ``x``: ``top`` the ``k``
    most likely ids as :func:`top_indices` ranks them (None for ``k`` 0). ``buf``: an intp
    buffer as long as ``x`` for the compiled pass's candidates (kept by the caller: a fresh one
    per step would be a 400 KB allocation).

    Compiled (``_scan.c``): one call, two passes over the vocabulary. Measured in the decode
    loop of the embedded model, where right after a decode each numpy call costs 2-5x its warm
    time: the time a token spends outside the decode fell from 0.73 to 0.56 ms; the float32
    sums of the numpy path err by up to 6e-5 nats, the compiled pass's by under 2e-7 (against
    float64, on 100 recorded steps)."""
    got = _compiled(x, k, buf)
    if got is not None:
        m, log_z, entropy, c = got
        return m, log_z, entropy, buf[:c].copy() if k > 0 else None
    m = float(x.max())
    log_z, entropy = _numpy_partition_entropy(x, m)
    return m, log_z, entropy, top_indices(x, k, m) if k > 0 else None


def _compiled(
    x: np.ndarray, k: int, buf: np.ndarray | None
) -> tuple[float, float, float, int] | None:
    """``(max, log_z, entropy, ranked count)`` from the compiled pass, or None where it cannot
    take ``x`` (not built, not a contiguous float32 vector, no finite maximum)."""
    if _scan is None:
        return None
    try:
        m, s, sd, c = _scan.scan(x, k, buf)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(m) and s > 0.0):
        return None
    log_s = math.log(s)  # log Z = m + log s; H = log s - E_p[x - m]
    return m, m + log_s, max(0.0, log_s - sd / s), c


def partition_entropy(
    x: np.ndarray, m: float | None = None, out: np.ndarray | None = None
) -> tuple[float, float]:
    """``(log_z, entropy)`` of raw logits ``x`` (``m``: x's maximum, when the caller has it;
    ``out``: a scratch buffer of x's shape and dtype, else one is allocated)."""
    got = _compiled(x, 0, None)
    if got is not None:
        return got[1], got[2]
    return _numpy_partition_entropy(x, m, out)


def _numpy_partition_entropy(
    x: np.ndarray, m: float | None = None, out: np.ndarray | None = None
) -> tuple[float, float]:
    """:func:`partition_entropy` without the compiled pass."""
    m = float(x.max()) if m is None else m
    z = np.subtract(x, m, out=out)
    np.exp(z, out=z)  # one buffer: in the decode loop each pass over the vocabulary counts
    s = float(z.sum())
    log_z = m + math.log(s)
    return log_z, max(0.0, log_z - float(np.dot(z, x)) / s)


def summarize(x: np.ndarray, k: int) -> tuple[float, float, np.ndarray | None]:
    """``(log_z, entropy, top_ids)`` of raw logits ``x`` (top ids most likely first): one
    :func:`scan` with a buffer of its own (a loop over steps keeps one and calls scan)."""
    _, log_z, entropy, top = scan(x, k, np.empty(x.shape[0], dtype=np.intp))
    return log_z, entropy, top


def candidates(top_k: int) -> int:
    """How many of the most likely tokens :func:`sample` looks at first for ``top_k`` (0: off):
    a :func:`top_indices` for that many serves both the alternatives and the sampling."""
    return min(top_k, NUCLEUS_CANDIDATES) if top_k > 0 else NUCLEUS_CANDIDATES


def ranking_size(alternatives: int, temperature: float, top_k: int) -> int:
    """How many ids a decode step ranks: the ``alternatives`` shown and, when it samples (not
    greedy), the candidates :func:`sample` reads (passed back to it as ``ranked``)."""
    return max(alternatives, candidates(top_k) if temperature > 0 else 0)


def _weights(x: np.ndarray, m: float, temperature: float) -> np.ndarray:
    """``exp((x - m) / temperature)`` in one new buffer (the same values as the expression,
    without its two temporaries over the vocabulary)."""
    z = x - m
    np.divide(z, temperature, out=z)
    return np.exp(z, out=z)


def log_partition(x: np.ndarray) -> float:
    """log sum exp(x), stably."""
    m = float(x.max())
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.exp(x - m).sum()))


def sample(
    x: np.ndarray,
    temperature: float,
    top_p: float,
    top_k: int,
    rng: np.random.Generator,
    ranked: np.ndarray | None = None,
    m: float | None = None,
) -> tuple[int, float]:
    """Draw a token from logits ``x`` with temperature, top-k (0: off) and top-p; returns the
    token and its log-probability in the distribution actually sampled (after truncation).

    Temperature 0 is greedy (log-probability 0). Top-p keeps tokens, most likely first, until
    the mass before a token reaches ``top_p`` (the first is always kept). ``ranked``: x's most
    likely ids, most likely first, when the caller has them (summarize's, for
    :func:`candidates` of ``top_k``): reused instead of scanning the vocabulary again; ``m``:
    x's maximum, when the caller has it (one pass over the vocabulary less).
    """
    if temperature <= 0:
        return int(np.argmax(x)), 0.0
    n = x.shape[0]
    k = top_k if 0 < top_k < n else n
    m = float(x.max()) if m is None else m
    p = min(1.0, top_p) if top_p > 0 else 1.0
    if k == n and p >= 1.0:
        w = _weights(x, m, temperature)
        whole = float(w.sum())
        r = rng.random() * whole
        tok = int(np.searchsorted(np.cumsum(w, dtype=np.float64), r, side="right"))
        tok = min(tok, n - 1)
        return tok, float(math.log(max(w[tok], 1e-45) / whole))
    take = min(k, NUCLEUS_CANDIDATES)
    # Candidates by logit (the order temperature keeps), most likely first; ``ranked`` (x's
    # top ids from summarize) saves the scan when it holds them.
    if ranked is not None and ranked.shape[0] >= take:
        idx = ranked[:take]
    else:
        idx = top_indices(x, take, m)
    total: float | None = None
    if take < k:
        # More candidates are allowed than taken: widen (x4) while these do not hold top_p of
        # the mass (a flat distribution: a reply's first token often needs ~1,000).
        total = float(_weights(x, m, temperature).sum())
        wi = np.exp((x[idx] - m) / temperature)
        while take < k and float(wi.sum()) / total < p:
            take = min(k, take * 4)
            idx = top_indices(x, take, m)
            wi = np.exp((x[idx] - m) / temperature)
        wl = wi.tolist()
    else:
        # The few candidates in plain floats: after a decode each numpy call on a small array
        # costs more than this arithmetic (sampling 97-107 us -> see bench backend).
        inv = 1.0 / temperature
        wl = [math.exp((v - m) * inv) for v in x[idx].tolist()]
    if k < n:
        mass = math.fsum(wl)
    else:
        mass = total if total is not None else float(_weights(x, m, temperature).sum())
    # Top-p: keep tokens while the mass before them is under top_p (the first always).
    limit = p * mass
    keep, z = 0, 0.0
    for wj in wl:
        if keep and z >= limit:
            break
        z += wj
        keep += 1
    r = rng.random() * z
    acc, j = 0.0, keep - 1
    for i in range(keep):
        acc += wl[i]
        if acc > r:
            j = i
            break
    return int(idx[j]), float(math.log(max(wl[j], 1e-45) / z))
