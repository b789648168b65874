"""The parser benchmark: deterministic input, honest counts, linear scaling."""

from __future__ import annotations

from thoughtform.bench.parse import _seed_with_think, bench_parse, make_text
from thoughtform.parse import parse_text


def test_make_text_is_deterministic_and_exact() -> None:
    a = make_text(50_000)
    assert a == make_text(50_000) and len(a) == 50_000
    assert a != make_text(50_000, seed=1)
    for construct in ("[Echo]\n", "<think>\n", "</think>", "```python\n", "](https://", "[Note]"):
        assert construct in a, construct


def test_benchmark_text_parses_into_many_voices_split_invariantly() -> None:
    text = make_text(200_000)
    vs = _seed_with_think()
    whole = parse_text(text, vs)
    assert parse_text(text, vs, chunk=4) == whole
    voices = {s.voice for s in whole}
    assert {"Echo", "Doubt", "think", "Note", "main"} <= voices
    # Markers inside the code fences stay text: every fenced "[Echo] not a marker" is in content.
    assert sum(s.raw.count("[Echo] not a marker") for s in whole) == text.count("[Echo] not a")


def test_bench_parse_reports_consistent_numbers() -> None:
    r = bench_parse(size_mb=1, piece=4)
    assert r["size_chars"] == 1_000_000 and r["pieces"] == 250_000
    assert r["events"] > r["pieces"]  # one Text per piece plus voice starts and ends
    assert abs(r["pieces_per_s"] - r["pieces"] / r["seconds"]) <= 0.01 * r["pieces_per_s"]
    assert abs(r["mb_per_s"] - 1 / r["seconds"]) <= 0.01 * r["mb_per_s"] + 0.001
    # Linear work gives ~10; re-scanning earlier text would give ~100. Loose for noisy CPUs.
    assert 2 < r["ratio_10x"] < 40
