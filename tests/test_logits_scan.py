"""The compiled pass over a step's logits (backends/_scan.c, through ``logits.scan``) against
float64 references and the numpy path: the maximum, log-partition, exact entropy and the top-k
ranking (ties by lower id, masked values never ranked), on both of its code paths."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from thoughtform.backends import logits as L


def ref(x: np.ndarray, k: int) -> tuple[float, float, list[int]]:
    """log Z, entropy (float64) and the top k (largest first, ties by lower id, finite only)."""
    xd = x.astype(np.float64)
    fin = np.isfinite(xd)
    m = float(xd[fin].max())
    e = np.exp(xd[fin] - m)
    s = float(e.sum())
    log_z = m + math.log(s)
    ent = log_z - float((e * xd[fin]).sum()) / s
    ids = [i for i in range(len(x)) if fin[i]]
    return log_z, ent, sorted(ids, key=lambda i: (-xd[i], i))[:k]


def logits_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """A language model's shape: a wide bulk, a few tokens far above it."""
    x = rng.normal(0.0, 3.0, n)
    hot = rng.choice(n, size=min(n, 5), replace=False)
    x[hot] += rng.uniform(5, 25, hot.shape[0])
    return x.astype(np.float32)


def test_the_pass_is_compiled_in_this_install() -> None:
    # setup.py builds it optionally; `make test`'s install must have built it, else every
    # decode step silently takes the slower numpy path the backend bench measures against.
    assert L.kernel() in {"avx2", "plain"}, "backends/_scan.c was not built (see setup.py)"


@pytest.mark.parametrize("seed", range(8))
def test_scan_matches_float64_and_a_full_sort(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 70_000))
    x = logits_like(rng, n)
    if seed % 2:
        x[rng.random(n) < 0.3] = -np.inf  # a mask
    buf = np.empty(n, dtype=np.intp)
    for k in (0, 1, 10, 40, 64, 700):
        m, log_z, ent, top = L.scan(x, k, buf)
        rz, rent, rtop = ref(x, k)
        assert m == float(x.max())
        assert log_z == pytest.approx(rz, abs=2e-6)
        assert ent == pytest.approx(rent, abs=2e-6)
        if k == 0:
            assert top is None
        else:
            assert top is not None and top.tolist() == rtop
            assert top.tolist() == L.top_indices(x, k).tolist()


def test_ties_short_vectors_and_more_k_than_finite_values() -> None:
    rng = np.random.default_rng(7)
    for _ in range(3000):
        n = int(rng.integers(1, 40))  # below and around one 8-wide vector
        x = rng.integers(-3, 3, n).astype(np.float32)
        if rng.random() < 0.4:
            x[rng.random(n) < 0.5] = -np.inf
        if not np.isfinite(x).any():
            x[int(rng.integers(n))] = 0.0
        k = int(rng.integers(1, n + 3))
        top = L.scan(x, k, np.empty(n, dtype=np.intp))[3]
        assert top is not None and top.tolist() == ref(x, k)[2]


def test_the_ranking_widens_past_the_first_margin() -> None:
    # Only 3 values within 8 nats of the top: the next 37 lie 20-60 nats below it.
    x = np.full(1000, -100.0, dtype=np.float32)
    x[[5, 6, 7]] = [10.0, 9.0, 8.0]
    x[100:137] = np.linspace(-10, -50, 37, dtype=np.float32)
    top = L.scan(x, 40, np.empty(1000, dtype=np.intp))[3]
    assert top is not None and top.tolist() == ref(x, 40)[2]


def test_entropy_of_known_distributions() -> None:
    buf = np.empty(1024, dtype=np.intp)
    flat = np.zeros(1024, dtype=np.float32)
    assert L.scan(flat, 5, buf)[2] == pytest.approx(math.log(1024), abs=1e-9)
    one = np.full(1024, -np.inf, dtype=np.float32)
    one[3] = 2.5
    m, log_z, ent, top = L.scan(one, 5, buf)
    assert (m, log_z, ent) == (2.5, 2.5, 0.0)
    assert top is not None and top.tolist() == [3]


def test_what_the_pass_cannot_take_goes_the_numpy_way() -> None:
    rng = np.random.default_rng(3)
    x = logits_like(rng, 5000)
    buf = np.empty(5000, dtype=np.intp)
    want = L.scan(x, 10, buf)
    for other in (x.astype(np.float64), x[::-1].copy()[::-1]):  # float64; a reversed view
        got = L.scan(other, 10, buf)
        assert got[3] is not None and want[3] is not None
        assert got[3].tolist() == want[3].tolist()
        assert got[1] == pytest.approx(want[1], abs=1e-4)
    # Every value masked: no finite maximum, nothing ranked by the numpy path either.
    dead = np.full(64, -np.inf, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        top = L.scan(dead, 5, np.empty(64, dtype=np.intp))[3]
    assert top is not None and top.tolist() == []


def test_infinities_and_nan_never_crash_the_pass() -> None:
    from thoughtform.backends import _scan

    x = np.zeros(50, dtype=np.float32)
    x[[3, 40]] = [np.inf, np.nan]
    # No candidates buffer: nothing may be written, +inf included (a NaN threshold).
    m, _, _, count = _scan.scan(x, 0, None)
    assert m == np.inf and count == 0
    buf = np.full(50, -1, dtype=np.intp)
    assert _scan.scan(x, 0, buf)[3] == 0 and (buf == -1).all()
    # A NaN is passed over by the maximum and never ranked.
    y = np.arange(20, dtype=np.float32)
    y[2] = np.nan
    m, _, _, count = _scan.scan(y, 3, buf)
    assert m == 19.0 and buf[:count].tolist() == [19, 18, 17]
    # A maximum that is not finite: nothing ranked (logits.scan takes the numpy path then).
    y[7] = np.inf
    assert _scan.scan(y, 3, buf)[::3] == (np.inf, 0)


def test_the_compiled_call_refuses_bad_buffers() -> None:
    from thoughtform.backends import _scan

    x = np.zeros(100, dtype=np.float32)
    with pytest.raises(TypeError, match="as long as x"):
        _scan.scan(x, 5, np.empty(10, dtype=np.intp))
    with pytest.raises(TypeError, match="intp"):
        _scan.scan(x, 5, np.empty(100, dtype=np.int32))
    with pytest.raises(TypeError, match="float32"):
        _scan.scan(np.zeros((10, 10), dtype=np.float32), 5, np.empty(100, dtype=np.intp))


def test_partition_entropy_uses_the_same_pass() -> None:
    rng = np.random.default_rng(11)
    x = logits_like(rng, 49_152)
    rz, rent, _ = ref(x, 0)
    log_z, ent = L.partition_entropy(x)
    assert log_z == pytest.approx(rz, abs=2e-6) and ent == pytest.approx(rent, abs=2e-6)


PLAIN = """
import json, sys
import numpy as np
from thoughtform.backends import logits as L
rng = np.random.default_rng(5)
out = []
for n in (7, 8, 1000, 49152):
    x = (rng.normal(0, 3, n) + (np.arange(n) == n // 2) * 12).astype(np.float32)
    m, lz, ent, top = L.scan(x, 40, np.empty(n, dtype=np.intp))
    out.append([lz, ent, top.tolist()])
print(json.dumps({"kernel": L.kernel(), "out": out}))
"""


def test_the_plain_path_agrees_with_the_vector_path() -> None:
    if L.kernel() != "avx2":
        pytest.skip("this CPU has no AVX2: the plain path is the only one (tested above)")
    runs = []
    for plain in (False, True):
        env = dict(os.environ)
        env.pop("THOUGHTFORM_SCAN_PLAIN", None)
        if plain:
            env["THOUGHTFORM_SCAN_PLAIN"] = "1"
        p = subprocess.run(
            [sys.executable, "-c", PLAIN], env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(p.stdout))
    assert [r["kernel"] for r in runs] == ["avx2", "plain"]
    for (za, ea, ta), (zb, eb, tb) in zip(runs[0]["out"], runs[1]["out"], strict=True):
        assert ta == tb
        assert za == pytest.approx(zb, abs=1e-6) and ea == pytest.approx(eb, abs=1e-6)
