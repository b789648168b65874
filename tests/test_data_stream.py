"""Big files stream in constant memory; an oversized line is reported, not loaded."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

from thoughtform.data.lines import iter_lines
from thoughtform.data.validate import validate

MB = 1024 * 1024


def _example(i: int, size: int) -> bytes:
    words = ("alpha beta gamma delta " * (size // 48 + 1))[: size // 2]
    ex = {
        "messages": [
            {"role": "user", "content": f"question {i} {words}"},
            {"role": "assistant", "content": f"[Echo]\n{words}\n\n[Doubt]\nreally {i}?"},
        ]
    }
    return json.dumps(ex).encode() + b"\n"


def _big_file(path: Path) -> tuple[int, int]:
    """~50 MB: 20 lines of ~1 MB, one 30 MB line in the middle, and small lines around it."""
    with path.open("wb") as f:
        for i in range(10):
            f.write(_example(i, MB))
        f.write(b'{"messages": [{"role": "user", "content": "')
        chunk = b"x" * MB
        for _ in range(30):
            f.write(chunk)
        f.write(b'"}]}\n')
        for i in range(10, 20):
            f.write(_example(i, MB))
        for i in range(20, 2020):
            f.write(_example(i, 200))
    return 11, 2020 + 1  # the oversized line's number, and the number of lines


def test_large_file_constant_memory(tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    long_line, n_lines = _big_file(p)
    assert p.stat().st_size > 50_000_000
    issues: list = []
    tracemalloc.start()
    try:
        report = validate(p, "seed", max_line_bytes=4 * MB, on_issue=issues.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * MB, f"peak {peak / MB:.1f} MB"
    assert [(i.line, i.code) for i in issues] == [(long_line, "line-too-long")]
    assert issues[0].reason == f"line too long ({30 * MB + 48} bytes; the limit is {4 * MB})"
    assert report.checked == n_lines and report.examples == n_lines - 1


def test_iter_lines_edges() -> None:
    data = b"\xef\xbb\xbfa\r\nbb\n" + b"c" * 10 + b"\n\xff\n" + b"d" * 12 + b"\nlast"
    lines = list(iter_lines(io.BytesIO(data), max_line_bytes=10))
    assert [(ln.number, ln.text) for ln in lines] == [
        (1, "a"),
        (2, "bb"),
        (3, "c" * 10),
        (4, None),
        (5, None),
        (6, "last"),
    ]
    assert lines[0].bom and lines[0].crlf and not lines[1].crlf
    assert lines[3].bad_utf8 == 1
    assert lines[4].too_long == 13
    kept = list(iter_lines(io.BytesIO(b"a\r\nb\n"), keep_ends=True))
    assert [ln.text for ln in kept] == ["a\n", "b\n"]
