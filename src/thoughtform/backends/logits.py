"""Per-step arithmetic on a vocabulary's logits, shared by the backends that see them.

Each step works in float32 on the full vocabulary (49,152 for SmolLM2) once: the log-partition
and exact entropy without materialising the log-softmax (H = log Z - E_p[x]), the top-k by
``argpartition``, and sampling that sorts only the few hundred candidates top-p keeps.
"""

from __future__ import annotations

import math

import numpy as np

# Candidates taken before top-p; if they hold less than top_p of the mass, all are sorted.
NUCLEUS_CANDIDATES = 256


def summarize(x: np.ndarray, k: int) -> tuple[float, float, np.ndarray | None]:
    """``(log_z, entropy, top_ids)`` of raw logits ``x`` (top ids most likely first)."""
    m = float(x.max())
    z = np.exp(x - m)
    s = float(z.sum())
    log_z = m + math.log(s)
    entropy = max(0.0, log_z - float(np.dot(z, x)) / s)
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return log_z, entropy, None
    idx = np.argpartition(x, n - k)[n - k :]
    return log_z, entropy, idx[np.argsort(-x[idx], kind="stable")]


def log_partition(x: np.ndarray) -> float:
    """log sum exp(x), stably."""
    m = float(x.max())
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.exp(x - m).sum()))


def sample(
    x: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator
) -> tuple[int, float]:
    """Draw a token from logits ``x`` with temperature, top-k (0: off) and top-p; returns the
    token and its log-probability in the distribution actually sampled (after truncation).

    Temperature 0 is greedy (log-probability 0). Top-p keeps tokens, most likely first, until
    the mass before a token reaches ``top_p`` (the first is always kept).
    """
    if temperature <= 0:
        return int(np.argmax(x)), 0.0
    n = x.shape[0]
    k = top_k if 0 < top_k < n else n
    m = float(x.max())
    scaled = (x - m) / temperature
    w = np.exp(scaled)
    total = float(w.sum())
    p = min(1.0, top_p) if top_p > 0 else 1.0
    if k == n and p >= 1.0:
        r = rng.random() * total
        tok = int(np.searchsorted(np.cumsum(w, dtype=np.float64), r, side="right"))
        tok = min(tok, n - 1)
        return tok, float(math.log(max(w[tok], 1e-45) / total))
    take = min(k, NUCLEUS_CANDIDATES)
    idx = np.argpartition(-scaled, take - 1)[:take]
    wi = w[idx]
    if take < k:
        # More candidates are allowed than taken: fall back to all of them if these few do not
        # already hold top_p of the mass (rare: a very flat distribution).
        if float(wi.sum()) / total < p:
            idx = np.argpartition(-scaled, k - 1)[:k] if k < n else np.arange(n)
            wi = w[idx]
    order = np.argsort(-wi, kind="stable")
    idx = idx[order]
    wi = wi[order]
    mass = float(wi.sum()) if k < n else total
    probs = wi / mass
    before = np.cumsum(probs) - probs
    keep = int(np.count_nonzero(before < p)) or 1
    idx = idx[:keep]
    wk = wi[:keep]
    z = float(wk.sum())
    r = rng.random() * z
    j = min(int(np.searchsorted(np.cumsum(wk, dtype=np.float64), r, side="right")), keep - 1)
    return int(idx[j]), float(math.log(max(float(wk[j]), 1e-45) / z))
