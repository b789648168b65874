"""The hand-built token line (``trace.token_line``) is character for character the generic
``json.dumps`` of the record, for any text (lone surrogates, control characters, quotes), any
float (NaN, infinities, -0.0, extremes), every optional field, and a cache shared across
records as the writer keeps it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from thoughtform.trace import (
    Alternative,
    AttentionSummary,
    TokenRecord,
    TraceWriter,
    _dumps,
    load_trace,
    token_line,
)

texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["", '"', "\\", "\n", "\u2028", "\ud800", "<0xE2>", " the", "[Echo]"]
)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, 1e-300, 5e-324])
maybe_float = st.none() | floats
ids = st.none() | st.integers(-(2**40), 2**40)
raw = st.none() | st.binary(max_size=6)

alternatives = st.builds(Alternative, texts, maybe_float, ids, raw)
records = st.builds(
    TokenRecord,
    index=st.integers(0, 10**9),
    text=texts,
    token_id=ids,
    logprob=maybe_float,
    top=st.lists(alternatives, max_size=6),
    entropy=maybe_float,
    voice=st.none() | texts,
    bytes=raw,
    t=maybe_float,
    steered=st.booleans(),
    steered_logprob=maybe_float,
    forced=st.booleans(),
    vector=st.none() | st.lists(st.tuples(texts, st.floats(-4, 4)).map(list), max_size=3),
    turn=st.none() | st.integers(0, 1000),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(records, min_size=1, max_size=5))
def test_token_line_is_the_generic_dump(recs: list[TokenRecord]) -> None:
    parts: dict[Any, Any] = {}  # one cache over several records, as one writer keeps it
    for rec in recs:
        line = token_line(rec, parts)
        assert line == _dumps(rec.to_dict())
        json.loads(line)  # strict JSON: no NaN, no raw control characters


def test_records_the_fast_path_leaves_to_the_generic_one() -> None:
    att = AttentionSummary(segment_mass=[[(0, 0.5)]], top=[[(3, 0.25)]], prompt_tokens=2)
    for rec in (
        TokenRecord(index=0, text="a", attention=att),
        TokenRecord(index=1, text="b", lens=["x", "y"]),
    ):
        assert token_line(rec, {}) == _dumps(rec.to_dict())


def test_the_writer_writes_lines_that_load_back(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    recs = [
        TokenRecord(
            index=i,
            text=t,
            token_id=i + 7,
            logprob=-0.5 * i,
            top=[Alternative(t, -0.5 * i, i + 7, t.encode("utf-8", "surrogatepass"))],
            entropy=1.25,
            voice="Echo",
            t=0.1 * i,
        )
        for i, t in enumerate(["[Echo]", " hi", ' "quoted"', "\ud83d"])
    ]
    with TraceWriter(path, {"kind": "generation"}) as w:
        for r in recs:
            w.token(r)
        w.end({"reason": "stop"})
    back = load_trace(path)
    assert [r.to_dict() for r in back.tokens] == [r.to_dict() for r in recs]
