"""Traces: JSONL round trip, strict JSON on disk, errors that name the line, interrupted writes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from thoughtform.parse import Segment, parse_text
from thoughtform.trace import (
    SCHEMA,
    Alternative,
    AttentionSummary,
    TokenRecord,
    Trace,
    TraceError,
    TraceWriter,
    is_trace_text,
    load_trace,
    parse_trace_lines,
)


def full_trace() -> Trace:
    """A trace using every field, with hostile text and non-finite numbers."""
    text = "[Echo]\nЯ \ud800\x1b[31m\u202e <b>&amp;</b>\n[/Echo] ok"
    toks = [text[i : i + 5] for i in range(0, len(text), 5)]
    tokens = [
        TokenRecord(
            index=i,
            text=t,
            token_id=100 + i,
            logprob=-0.5 * i,
            top=[
                Alternative(t, -0.5 * i, 100 + i, t.encode("utf-8", "surrogatepass")),
                Alternative("alt\n", -2.25, None, None),
            ],
            entropy=1.25,
            voice="Echo",
            bytes=b"\xff\x00",
            attention=AttentionSummary([[(0, 0.75), (1, 0.25)]], [[(3, 0.5)]], [0.125]),
            lens=["a", "b"],
            t=0.001 * i,
        )
        for i, t in enumerate(toks)
    ]
    return Trace(
        meta={"kind": "generation", "model": "m", "sampling": {"temperature": 0.7}},
        tokens=tokens,
        segments=parse_text(text, "seed"),
        finish={
            "reason": "stop",
            "message": "",
            "timings": {"total_s": 1.5},
            "tokens": len(tokens),
        },
        source_text=text,
    )


def seg_tuple(s: Segment) -> tuple[object, ...]:
    """What a segment record keeps."""
    return (s.voice, s.text, s.start, s.end, s.marker, s.close_marker, s.tokens)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    tr = full_trace()
    p = tmp_path / "t.jsonl"
    tr.save(p)
    raw = p.read_bytes()
    assert raw.isascii()  # lone surrogates and controls are escaped, never raw in the file
    back = load_trace(p)
    assert back.meta == tr.meta
    assert back.tokens == tr.tokens
    assert [seg_tuple(s) for s in back.segments] == [seg_tuple(s) for s in tr.segments]
    assert back.finish == tr.finish
    assert back.source_text == back.text == tr.source_text
    assert not back.interrupted
    # Saving what was loaded gives the same bytes.
    assert back.to_jsonl() == tr.to_jsonl() == raw.decode("ascii")


def test_non_finite_numbers_are_null(tmp_path: Path) -> None:
    tok = TokenRecord(
        index=0,
        text="x",
        logprob=math.nan,
        top=[Alternative("x", -math.inf), Alternative("y", math.inf)],
        entropy=math.inf,
        attention=AttentionSummary([[(0, math.nan)]], [[(0, math.inf)]], [math.nan]),
        t=math.nan,
    )
    tr = Trace(
        meta={"temperature": math.nan, "stop": ("a", "b"), "path": tmp_path, "blob": b"\x01"},
        tokens=[tok],
        finish={"reason": "stop", "timings": {"tokens_per_s": math.inf}},
    )
    text = tr.to_jsonl()
    assert "NaN" not in text and "Infinity" not in text
    recs = [json.loads(line) for line in text.splitlines()]
    assert recs[0] == {
        "type": "meta",
        "schema": SCHEMA,
        "temperature": None,
        "stop": ["a", "b"],
        "path": str(tmp_path),
        "blob": "01",
    }
    assert recs[1]["logprob"] is None and recs[1]["entropy"] is None and "t" not in recs[1]
    assert [a["logprob"] for a in recs[1]["top"]] == [None, None]
    assert recs[1]["attention"] == {
        "segment_mass": [[[0, None]]],
        "top": [[[0, None]]],
        "prompt_mass": [None],
        "prompt_tokens": 0,
    }
    assert recs[2]["timings"] == {"tokens_per_s": None}
    back = parse_trace_lines(text.splitlines())
    t = back.tokens[0]
    assert t.logprob is None and t.entropy is None and t.t is None
    assert [a.logprob for a in t.top] == [None, None]
    assert t.attention is not None and math.isnan(t.attention.segment_mass[0][0][1])


def test_meta_cannot_override_record_type_or_schema() -> None:
    tr = Trace(
        meta={"type": "token", "schema": 99, "x": 1}, finish={"type": "meta", "reason": "stop"}
    )
    back = parse_trace_lines(tr.to_jsonl())
    assert back.meta == {"x": 1} and back.finish == {"reason": "stop"}


def test_whole_text_and_bytes_lines_are_accepted() -> None:
    text = full_trace().to_jsonl()
    assert parse_trace_lines(text).tokens == full_trace().tokens
    assert parse_trace_lines(text.encode().splitlines(keepends=True)).tokens == full_trace().tokens
    assert parse_trace_lines("\ufeff" + text).meta == full_trace().meta


META = '{"type":"meta","schema":1}'
TOKEN0 = '{"type":"token","index":0,"text":"a"}'
TOKEN1 = '{"type":"token","index":1,"text":"b"}'
TOKEN2 = '{"type":"token","index":2,"text":"c"}'

BAD_LINES = [
    (
        [META, "{oops", TOKEN0],
        2,
        "invalid JSON (Expecting property name enclosed in double quotes at column 2)",
    ),
    ([META, "[1, 2]"], 2, "expected a JSON object, got list"),
    ([META, "[" * 100_000], 2, "invalid JSON (nested too deeply)"),
    ([META, TOKEN0, '{"type":"token","text":"b"}'], 3, "token record: missing field 'index'"),
    (
        [META, '{"type":"token","index":"0","text":"a"}'],
        2,
        "token record: 'index' must be an integer",
    ),
    ([META, '{"type":"token","index":0,"text":5}'], 2, "token record: 'text' must be a string"),
    ([META, TOKEN1], 2, "token record: token index 1, expected 0"),
    ([META, TOKEN0, TOKEN0], 3, "token record: token index 0, expected 1"),
    (
        [META, '{"type":"token","index":0,"text":"a","bytes":"zz"}'],
        2,
        "token record: non-hexadecimal",
    ),
    (
        [META, '{"type":"token","index":0,"text":"a","top":[1]}'],
        2,
        "'top' must be a list of objects",
    ),
    (
        [META, '{"type":"segment","voice":"Echo","text":"x","start":"0","end":1}'],
        2,
        "'start' must be an integer",
    ),
    ([META, '{"type":"text","text":null}'], 2, "text record: 'text' must be a string"),
    ([META, META], 2, "meta record: a second meta record"),
    ([META, '{"type":"weird"}'], 2, "unknown record type 'weird'"),
    ([META, '{"text":"no type"}'], 2, "unknown record type None"),
    ([TOKEN0], 1, 'the first record must be {"type":"meta",...}'),
    (['{"type":"meta","schema":2}'], 1, "unsupported schema 2 (expected 1)"),
]


@pytest.mark.parametrize(("lines", "lineno", "why"), BAD_LINES)
def test_errors_name_the_line(tmp_path: Path, lines: list[str], lineno: int, why: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TraceError) as info:
        load_trace(p)
    assert str(info.value).startswith(f"{p}:{lineno}: "), str(info.value)
    assert why in str(info.value)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.jsonl: file not found"):
        load_trace(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TraceError, match=r"empty\.jsonl: empty trace: no meta record$"):
        load_trace(empty)
    utf = tmp_path / "utf.jsonl"
    utf.write_bytes(
        META.encode() + b'\n{"type":"text","text":"ok"}\n{"type":"text","text":"\xff"}\n'
    )
    with pytest.raises(TraceError, match=r"utf\.jsonl:3: not valid UTF-8 \(byte 24 of the line\)"):
        load_trace(utf)
    errs: list[str] = []
    assert load_trace(utf, errs).source_text == "ok" and len(errs) == 1


def test_lenient_mode_keeps_every_valid_record(tmp_path: Path) -> None:
    lines = [
        META,
        TOKEN0,
        '{"type":"token","index":1,"text":"b"',  # torn in the middle of the file
        TOKEN2,
        "garbage",
        '{"type":"segment","voice":"Echo","text":"abc","start":0,"end":3,"tokens":[0,2]}',
        '{"type":"segment","voice":"Echo"}',
        '{"type":"end","reason":"stop"}',
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errs: list[str] = []
    tr = load_trace(p, errs)
    assert [(t.index, t.text) for t in tr.tokens] == [(0, "a"), (1, ""), (2, "c")]
    assert [s.voice for s in tr.segments] == ["Echo"] and tr.segments[0].tokens == (0, 2)
    assert tr.finish == {"reason": "stop"}
    assert [e.split(": ", 1)[0] for e in errs] == [f"{p}:3", f"{p}:4", f"{p}:5", f"{p}:7"]
    assert "token records 1..1 are missing (kept as empty tokens)" in errs[1]
    # Without a meta line, the records are kept and the problem is reported once.
    errs2: list[str] = []
    tr2 = parse_trace_lines([TOKEN0, TOKEN1], "x", errs2)
    assert len(tr2.tokens) == 2 and errs2 == ['x:1: the first record must be {"type":"meta",...}']


def test_interrupted_flags() -> None:
    assert Trace(meta={"kind": "generation"}).interrupted
    assert not Trace(meta={"kind": "transcript"}).interrupted
    assert Trace(tokens=[TokenRecord(0, "a")]).interrupted
    for reason, interrupted in (
        ("stop", False),
        ("length", False),
        ("cancelled", True),
        ("error", True),
    ):
        assert Trace(finish={"reason": reason}).interrupted is interrupted


def test_is_trace_text() -> None:
    assert is_trace_text(full_trace().to_jsonl()[:100])  # cut mid-line: still recognised
    assert is_trace_text("\ufeff" + META)
    assert not is_trace_text("[Echo]\nhello")
    assert not is_trace_text('{"type":"token"}')
    assert not is_trace_text("")


def test_writer_without_end_leaves_a_loadable_interrupted_trace(tmp_path: Path) -> None:
    p = tmp_path / "w.jsonl"
    with TraceWriter(p, {"kind": "generation", "type": "x"}, flush_every=4) as w:
        for i in range(10):
            w.token(TokenRecord(i, f"t{i}", logprob=-0.1))
        w.segment(Segment("main", "t0", 0, 2))
    tr = load_trace(p)
    assert tr.meta == {"kind": "generation"} and len(tr.tokens) == 10 and tr.interrupted
    w2 = TraceWriter(p, {"kind": "generation"})
    w2.token(TokenRecord(0, "a"))
    w2.end({"reason": "stop", "timings": {"total_s": math.nan}})
    w2.token(TokenRecord(1, "late"))  # after end: ignored, the file is closed
    tr2 = load_trace(p)
    assert len(tr2.tokens) == 1 and not tr2.interrupted
    assert tr2.finish == {"reason": "stop", "timings": {"total_s": None}}


def test_writer_killed_mid_stream_leaves_flushed_tokens(tmp_path: Path) -> None:
    """A real process SIGKILLed while streaming: every flushed token loads, trace interrupted."""
    p = tmp_path / "killed.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal
        from thoughtform.trace import TraceWriter, TokenRecord
        w = TraceWriter({str(p)!r}, {{"kind": "generation"}}, flush_every=5)
        for i in range(23):
            w.token(TokenRecord(i, "tok%d " % i, logprob=-1.0))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    tr = load_trace(p)
    assert len(tr.tokens) == 20  # four flushes of five; the last three were still buffered
    assert tr.interrupted and tr.finish is None
    assert tr.text == "".join(f"tok{i} " for i in range(20))


def test_torn_last_line_is_an_interruption_not_an_error(tmp_path: Path) -> None:
    p = tmp_path / "torn.jsonl"
    p.write_text(f"{META}\n{TOKEN0}\n{TOKEN1[:17]}", encoding="utf-8")
    tr = load_trace(p)
    assert [t.text for t in tr.tokens] == ["a"] and tr.interrupted
    errs: list[str] = []
    assert len(load_trace(p, errs).tokens) == 1 and errs == []
    # Without line ends (pre-split lines) a broken last line is still reported.
    with pytest.raises(TraceError, match=r"<trace>:3: invalid JSON"):
        parse_trace_lines([META, TOKEN0, TOKEN1[:17]])


def test_segment_records_keep_markers_and_token_ranges() -> None:
    segs = parse_text("a\n[Echo]: b [/Echo] c", "seed")
    segs[1].tokens = (1, 4)
    back = parse_trace_lines(Trace(segments=segs).to_jsonl()).segments
    assert [seg_tuple(s) for s in back] == [seg_tuple(s) for s in segs]
    assert back[1].marker == "[Echo]:" and back[1].close_marker == "[/Echo]"


def test_stream_loading_does_not_read_whole_file_first(tmp_path: Path) -> None:
    """A big trace (50k tokens) loads line by line in reasonable time and memory."""
    p = tmp_path / "big.jsonl"
    with TraceWriter(p, {"kind": "generation"}, flush_every=1000) as w:
        for i in range(50_000):
            w.token(TokenRecord(i, "x", logprob=-0.5, top=[Alternative("x", -0.5)]))
        w.end({"reason": "length"})
    assert os.path.getsize(p) > 3_000_000
    tr = load_trace(p)
    assert len(tr.tokens) == 50_000 and tr.tokens[-1].index == 49_999 and not tr.interrupted
