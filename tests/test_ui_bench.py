"""``bench ui`` end to end (real server, real Chromium): the numbers it reports hold."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser
pytest.importorskip("playwright.sync_api")


def test_bench_ui_measures_a_fast_multi_voice_reply() -> None:
    from thoughtform.bench.ui import bench_ui

    res = bench_ui(tokens=1200)
    assert res["tokens_displayed"] == 1200
    assert res["tokens_per_s_displayed"] >= 200
    # Only new events travel: the last tokens cost what the first ones did.
    assert res["bytes_per_token_ratio"] <= 1.5
    assert 50 <= res["bytes_per_token_first"] <= 600
    # Two independent byte counts (page-side SSE tee, CDP network events) agree.
    assert abs(res["sse_bytes_total"] - res["sse_bytes_total_cdp"]) <= 0.02 * res["sse_bytes_total"]
    assert res["lag_last_token_ms"] is not None and 0 <= res["lag_last_token_ms"] < 3000


def test_synthetic_trace_is_multi_voice_and_exact_length() -> None:
    from thoughtform.bench.ui import synthetic_trace
    from thoughtform.parse import parse_text

    tr = synthetic_trace(777)
    assert len(tr.tokens) == 777
    voices = {s.voice for s in parse_text(tr.text, "seed")}
    assert len(voices) >= 6
    assert all(len(t.top) == 5 and t.logprob is not None for t in tr.tokens)
