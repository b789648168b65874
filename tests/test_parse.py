"""Voice parser: golden fixtures at every split point, spec examples, a reference parser, regressions."""

from __future__ import annotations

import json
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from thoughtform.parse import (
    Event,
    Segment,
    SegmentBuilder,
    Text,
    VoiceEnd,
    VoiceParser,
    VoiceStart,
    parse_text,
    rebuild,
)
from thoughtform.voices import PRESETS, VoiceSet, resolve_voice_set, voice_set_from_dict

FIXTURES = Path(__file__).parent / "fixtures" / "parse"

SegTuple = tuple[str, str, int, int, str, str]

# A set mixing bracket voices, aliases, and a tag voice with an alias (used by several tests).
MIXED = voice_set_from_dict(
    {
        "name": "mixed",
        "voices": [
            {"name": "Echo", "aliases": ["echo-voice", "E"]},
            "Doubt",
            {"name": "think", "syntax": "tag", "aliases": ["reasoning"]},
        ],
    }
)
STRICT = voice_set_from_dict(
    {
        "name": "strict",
        "unknown": "strict",
        "voices": ["Echo", "Doubt", {"name": "think", "syntax": "tag"}],
    }
)
ALL_SETS: tuple[VoiceSet, ...] = (PRESETS["seed"], PRESETS["think"], MIXED, STRICT)


# -- an independent, whole-text reference implementation of the spec -----------------------


def _name_ok(name: str) -> bool:
    """The lenient name rule, written out again from the spec."""
    if not 1 <= len(name) <= 32 or not name[0].isalpha() or name.endswith(" "):
        return False
    return all(
        c.isalnum() or c in " _-" or unicodedata.category(c).startswith("M") for c in name[1:]
    )


def reference_segments(text: str, vs: VoiceSet, starts_in: str | None = None) -> list[SegTuple]:
    """Segments of ``text`` computed line by line on the whole string (no incrementality)."""
    main = vs.default_voice
    unknown: dict[str, str] = {}
    limit = max([32] + [len(k) for v in vs.voices for k in (v.name, *v.aliases)])

    def canonical(name: str, register: bool) -> str | None:
        v = vs.get(name)
        if v is not None:
            return v.name
        if vs.unknown != "lenient" or not _name_ok(name):
            return None
        if name.casefold() == main.casefold():
            return main
        if register:
            return unknown.setdefault(name.casefold(), name)
        return unknown.get(name.casefold(), name)

    tags = [
        (f"<{'/' if close else ''}{k.lower()}>", v.name, close)
        for v in vs.voices
        if v.syntax == "tag"
        for k in (v.name, *v.aliases)
        for close in (False, True)
    ]
    cur = (canonical(starts_in, True) or starts_in) if starts_in else main
    first = cur
    n = len(text)
    markers: list[tuple[int, int, str, bool]] = []

    def bracket(p: int, end: int, allow_open: bool) -> tuple[int, str, bool] | None:
        k = p + 1
        close = k < end and text[k] == "/"
        if close:
            k += 1
        elif not allow_open:
            return None
        q = text.find("]", k, end)
        if q < 0 or not 1 <= q - k <= limit:
            return None
        e = q + 1
        if e < n and text[e] == "(":
            return None
        voice = canonical(text[k:q], register=not close)
        if voice is None:
            return None
        if close:
            return (e, voice, True) if voice == cur and voice != main else None
        if e < n and text[e] == ":":
            e += 1
        return e, voice, False

    def tag(p: int) -> tuple[int, str, bool] | None:
        for m, voice, close in tags:
            chunk = text[p : p + len(m)]
            if chunk.isascii() and chunk.lower() == m and (not close or voice == cur):
                return p + len(m), voice, close
        return None

    fence: tuple[str, int] | None = None
    ls = 0
    while True:
        nl = text.find("\n", ls)
        le = n if nl < 0 else nl
        j = ls
        while j < le and text[j] in " \t":
            j += 1
        r = j
        while r < le and j < le and text[r] == text[j]:
            r += 1
        if fence is not None:
            if text[j : j + 1] == fence[0] and r - j >= fence[1] and not text[r:le].strip(" \t\r"):
                fence = None
        elif j < le and text[j] in "`~" and r - j >= 3:
            fence = (text[j], r - j)
        else:
            q = j
            if j < le and text[j] in "`~":
                q = r
            elif text[j : j + 1] == "[":
                found = bracket(j, le, True)
                if found:
                    markers.append((j, *found))
                    cur = main if found[2] else found[1]
                    q = found[0]
                else:
                    q = j + 1
            while q < le:
                ch = text[q]
                found = bracket(q, le, False) if ch == "[" else tag(q) if ch == "<" else None
                if found:
                    markers.append((q, *found))
                    cur = main if found[2] else found[1]
                    q = found[0]
                else:
                    q += 1
        if nl < 0:
            break
        ls = nl + 1

    segs: list[SegTuple] = []

    def add(voice: str, a: int, b: int, marker: str, close_marker: str) -> None:
        segs.append((voice, text[a:b].strip(), a, b, marker, close_marker))

    implicit = (first, 0)
    opened: tuple[str, int, str] | None = None
    for ms, me, voice, close in markers:
        if opened:
            add(opened[0], opened[1], ms, opened[2], text[ms:me] if close else "")
        elif close or ms > implicit[1]:
            add(implicit[0], implicit[1], ms, "", text[ms:me] if close else "")
        opened = None if close else (voice, me, text[ms:me])
        implicit = (main, me)
    if opened:
        add(opened[0], opened[1], n, opened[2], "")
    elif n > implicit[1]:
        add(implicit[0], implicit[1], n, "", "")
    return segs


# -- helpers --------------------------------------------------------------------------------


def longest_marker(vs: VoiceSet) -> int:
    """Length of the longest possible marker: ``[/`` + name + ``]``, ``[`` + name + ``]:``, tags."""
    names = [len(k) for v in vs.voices for k in (v.name, *v.aliases)]
    longest = max([32, *names]) + 3
    tags = [len(k) + 3 for v in vs.tag_voices for k in (v.name, *v.aliases)]
    return max([longest, *tags])


def as_tuples(segs: Sequence[Segment]) -> list[SegTuple]:
    """Segments as comparable tuples."""
    return [(s.voice, s.text, s.start, s.end, s.marker, s.close_marker) for s in segs]


def run_checked(
    pieces: Sequence[str], vs: VoiceSet, starts_in: str | None = None
) -> list[SegTuple]:
    """Feed ``pieces`` (piece k is token k) and check every invariant on the way; the segments."""
    parser = VoiceParser(vs, starts_in=starts_in)
    bound = longest_marker(vs) + 2
    events: list[Event] = []
    spans: list[tuple[int, int, int]] = []
    off = 0
    for k, piece in enumerate(pieces):
        spans.append((off, off + len(piece), k))
        off += len(piece)
        events += parser.feed(piece, k)
        assert len(parser._pending) <= bound, (pieces, parser._pending)
        assert parser.emitted + len(parser._pending) == parser.offset == off
    events += parser.close()
    text = "".join(pieces)
    assert rebuild(events) == text
    assert parser.emitted == len(text)

    starts = [x for x, _, _ in spans]

    def overlapping(a: int, b: int) -> tuple[int, ...]:
        # Pieces are contiguous: only those starting before b can overlap [a, b).
        hi = bisect_left(starts, b)
        lo = max(0, bisect_right(starts, a) - 1)
        return tuple(k for x, y, k in spans[lo:hi] if x < b and y > a)

    depth = 0
    for ev in events:
        if isinstance(ev, Text):
            assert depth == 1 and ev.text
            assert text[ev.start : ev.start + len(ev.text)] == ev.text
            assert ev.tokens == overlapping(ev.start, ev.start + len(ev.text))
        elif isinstance(ev, VoiceStart):
            assert depth == 0
            depth = 1
            assert text[ev.marker_start : ev.start] == ev.marker
            if ev.marker:
                assert ev.tokens == overlapping(ev.marker_start, ev.start)
        else:
            assert depth == 1
            depth = 0
            assert text[ev.end : ev.end + len(ev.marker)] == ev.marker
            want = overlapping(ev.end, ev.end + len(ev.marker)) if ev.marker else ()
            assert ev.tokens == want
    assert depth == 0

    builder = SegmentBuilder()
    builder.add(events)
    segs = builder.segments
    # Lossless through segments too: markers and raw content spans rebuild the input.
    assert "".join(s.marker + text[s.start : s.end] + s.close_marker for s in segs) == text
    for s in segs:
        assert s.raw == text[s.start : s.end]
        assert s.text == s.raw.strip()
    return as_tuples(segs)


def load_fixture(name: str) -> tuple[str, VoiceSet, str | None, list[SegTuple]]:
    """Input text, voice set, starts_in and golden segments of one fixture."""
    text = (FIXTURES / f"{name}.txt").read_bytes().decode("utf-8")
    lines = (FIXTURES / f"{name}.expected.jsonl").read_text(encoding="utf-8").splitlines()
    opts = json.loads(lines[0])["options"]
    spec = opts["voices"]
    vs = resolve_voice_set(FIXTURES / spec if spec.endswith(".yaml") else spec)
    rows: list[dict[str, Any]] = [json.loads(line) for line in lines[1:]]
    expected = [
        (r["voice"], r["text"], r["start"], r["end"], r["marker"], r["close_marker"]) for r in rows
    ]
    return text, vs, opts["starts_in"], expected


FIXTURE_NAMES = sorted(p.name[: -len(".txt")] for p in FIXTURES.glob("*.txt"))


def test_there_are_enough_fixtures() -> None:
    assert len(FIXTURE_NAMES) >= 15
    for name in FIXTURE_NAMES:
        assert (FIXTURES / f"{name}.expected.jsonl").is_file(), name


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_golden_whole_and_reference(name: str) -> None:
    text, vs, starts_in, expected = load_fixture(name)
    assert as_tuples(parse_text(text, vs, starts_in)) == expected
    assert reference_segments(text, vs, starts_in) == expected
    # Offsets are character offsets of the raw content, and text is that content stripped.
    for voice, stripped, start, end, _, _ in expected:
        assert text[start:end].strip() == stripped, voice


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_every_split_point(name: str) -> None:
    text, vs, starts_in, expected = load_fixture(name)
    for cut in range(len(text) + 1):
        assert run_checked([text[:cut], text[cut:]], vs, starts_in) == expected, cut
    for size in (1, 2, 3, 5, 8):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert run_checked(pieces, vs, starts_in) == expected, size


SMALL = [n for n in FIXTURE_NAMES if len((FIXTURES / f"{n}.txt").read_text("utf-8")) <= 120]


@pytest.mark.parametrize("name", SMALL)
def test_fixture_every_three_way_split(name: str) -> None:
    text, vs, starts_in, expected = load_fixture(name)
    for a, b in combinations(range(len(text) + 1), 2):
        pieces = [text[:a], text[a:b], text[b:]]
        assert run_checked(pieces, vs, starts_in) == expected, (a, b)


def test_small_fixtures_exist_for_three_way_splits() -> None:
    assert len(SMALL) >= 2


# -- the examples and rules of the spec, one by one -----------------------------------------


def pairs(
    text: str, voices: str | VoiceSet = "seed", starts_in: str | None = None
) -> list[tuple[str, str]]:
    """(voice, text) of each segment."""
    return [(s.voice, s.text) for s in parse_text(text, voices, starts_in)]


def test_spec_examples() -> None:
    text = "[Echo]\nI do not know where I end.\n\n[Resonance]\nJust watch the tokens."
    assert pairs(text) == [
        ("Echo", "I do not know where I end."),
        ("Resonance", "Just watch the tokens."),
    ]
    assert pairs("<think>\nhmm\n</think>\nIt is 4.", "think") == [
        ("think", "hmm"),
        ("main", "It is 4."),
    ]
    assert pairs("see [Echo] here") == [("main", "see [Echo] here")]


def test_segment_offsets_are_raw_content_spans() -> None:
    segs = parse_text("intro\n[Echo]: hi \n[/Echo] out")
    assert [s.to_dict() for s in segs] == [
        {"voice": "main", "text": "intro", "start": 0, "end": 6},
        {"voice": "Echo", "text": "hi", "start": 13, "end": 18},
        {"voice": "main", "text": "out", "start": 25, "end": 29},
    ]
    assert [(s.marker, s.close_marker) for s in segs] == [
        ("", ""),
        ("[Echo]:", "[/Echo]"),
        ("", ""),
    ]


def test_bracket_marker_position_rules() -> None:
    assert pairs(" \t [Doubt] x") == [("main", ""), ("Doubt", "x")]
    assert pairs("a\n[Doubt] x") == [("main", "a"), ("Doubt", "x")]
    assert pairs("a [Doubt] x") == [("main", "a [Doubt] x")]
    assert pairs("\u00a0[Doubt] x") == [("main", "[Doubt] x")]  # NBSP is not space/tab
    assert pairs("[Echo][Doubt]") == [("Echo", "[Doubt]")]  # only one marker per line start
    assert pairs("[Doubt](x) y") == [("main", "[Doubt](x) y")]
    assert pairs("[Doubt] (x) y") == [("Doubt", "(x) y")]
    assert pairs("[Doubt]:(x)") == [("Doubt", "(x)")]  # the colon belongs to the marker
    assert pairs("[Doubt]::x") == [("Doubt", ":x")]


def test_names_declared_aliases_and_lenient() -> None:
    assert pairs("[eCHo] a\n[echo-voice] b\n[e] c", MIXED) == [
        ("Echo", "a"),
        ("Echo", "b"),
        ("Echo", "c"),
    ]
    assert pairs("[Мысль] a\n[мысль] b") == [("Мысль", "a"), ("Мысль", "b")]  # first spelling wins
    assert pairs("[Мысль] a", STRICT) == [("main", "[Мысль] a")]
    assert pairs("[a" + "b" * 31 + "] x") == [("a" + "b" * 31, "x")]
    assert pairs("[a" + "b" * 32 + "] x") == [("main", "[a" + "b" * 32 + "] x")]
    for bad in ("[1a] x", "[_a] x", "[a ] x", "[ a] x", "[a.b] x", "[a\u200db] x", "[] x"):
        assert pairs(bad) == [("main", bad)], bad
    assert pairs("[e\u0301] x") == [("e\u0301", "x")]  # combining marks may continue a name


def test_main_by_name_is_the_default_voice() -> None:
    # Regression: "[Main]" used to open a new, differently coloured voice called "Main".
    assert pairs("[Echo] a\n[Main] b\n[main] c") == [("Echo", "a"), ("main", "b"), ("main", "c")]
    assert pairs("[Echo] a\n[/main] b") == [("Echo", "a\n[/main] b")]
    assert pairs("[Echo] a\n[Main] b", STRICT) == [("Echo", "a\n[Main] b")]


def test_close_markers() -> None:
    assert pairs("[Echo] a [/Echo] b") == [("Echo", "a"), ("main", "b")]
    assert pairs("[Echo] a [/Doubt] b") == [("Echo", "a [/Doubt] b")]
    assert pairs("a [/Echo] b") == [("main", "a [/Echo] b")]
    assert pairs("[Echo] a [/ECHO] b") == [("Echo", "a"), ("main", "b")]
    assert pairs("[Echo] a [/Echo](u) b") == [("Echo", "a [/Echo](u) b")]
    assert pairs("[e] a [/echo-voice] b", MIXED) == [("Echo", "a"), ("main", "b")]


def test_tags() -> None:
    assert pairs("a <think>b</think> c", "think") == [("main", "a"), ("think", "b"), ("main", "c")]
    assert pairs("<Think>b</THINK>", "think") == [("think", "b")]
    assert pairs("a </think> b", "think") == [("main", "a </think> b")]
    assert pairs("<thinking>b", "think") == [("main", "<thinking>b")]
    assert pairs("<reasoning>b</think>c", MIXED) == [("think", "b"), ("main", "c")]
    # U+212A KELVIN SIGN lowercases to "k": it must not make "<thin\u212a>" a tag.
    assert pairs("<thin\u212a>b", "think") == [("main", "<thin\u212a>b")]
    # The seed set declares no tag voices: tags are plain text there.
    assert pairs("<think>b</think>") == [("main", "<think>b</think>")]


def test_starts_in() -> None:
    assert pairs("hmm\n</think>\nIt is 4.", "think", "think") == [
        ("think", "hmm"),
        ("main", "It is 4."),
    ]
    assert pairs("a\n<think>b</think>c", "think", "think") == [
        ("think", "a"),
        ("think", "b"),
        ("main", "c"),
    ]
    # An opening marker of the open voice right at the start adds no empty segment.
    assert pairs("<think>b", "think", "think") == [("think", "b")]
    assert pairs("x\n[echo] y", "seed", "ECHO") == [("Echo", "x"), ("Echo", "y")]
    assert pairs("[/Echo] y", "seed", "Echo") == [("Echo", ""), ("main", "y")]
    assert pairs("x [/Tangent] y", "seed", "Tangent") == [("Tangent", "x"), ("main", "y")]


def test_code_fences() -> None:
    assert pairs("```\n[Echo] a\n```\n[Echo] b") == [("main", "```\n[Echo] a\n```"), ("Echo", "b")]
    assert pairs("~~~~\n[Echo]\n~~~\n[Echo]\n~~~~ \t\n[Echo] b")[-1] == ("Echo", "b")
    # A longer closing run closes; a shorter one, another char, or trailing text does not.
    assert pairs("```\n`````\n[Echo] b")[-1] == ("Echo", "b")
    assert pairs("````\n```\n[Echo] b") == [("main", "````\n```\n[Echo] b")]
    assert pairs("```\n~~~\n[Echo] b") == [("main", "```\n~~~\n[Echo] b")]
    assert pairs("```\n``` x\n[Echo] b") == [("main", "```\n``` x\n[Echo] b")]
    assert pairs("``\n[Echo] b") == [("main", "``"), ("Echo", "b")]
    assert pairs("a ```\n[Echo] b") == [("main", "a ```"), ("Echo", "b")]  # not at line start
    assert pairs("<think>\n```\n</think>\n```\n</think>x", "think") == [
        ("think", "```\n</think>\n```"),
        ("main", "x"),
    ]
    assert pairs("```<think>\nx", "think") == [("main", "```<think>\nx")]  # info string is inside


def test_crlf_and_cr() -> None:
    assert pairs("[Echo]\r\na\r\n[Doubt]\r\nb\r\n") == [("Echo", "a"), ("Doubt", "b")]
    assert pairs("```\r\n[Echo]\r\n```\r\n[Doubt] b") == [
        ("main", "```\r\n[Echo]\r\n```"),
        ("Doubt", "b"),
    ]
    # A lone CR is not a line break (the parser follows "\n" only).
    assert pairs("a\r[Echo] b") == [("main", "a\r[Echo] b")]


def test_reference_agrees_on_the_spec_cases() -> None:
    cases = [
        ("[Echo]\n```\n[Doubt]\n```\n[/Echo] x <think>y</think>", MIXED, None),
        ("a\n  [E]: b [/e] c\n<REASONING>d", MIXED, None),
        ("x\n[Note]\n[/note] y\n[Main] z", PRESETS["seed"], "Echo"),
    ]
    for text, vs, starts_in in cases:
        assert run_checked([text], vs, starts_in) == reference_segments(text, vs, starts_in)


# -- events, tokens and the incremental API --------------------------------------------------


def test_event_stream_shape() -> None:
    p = VoiceParser("seed")
    events = p.feed("[Ec", 0) + p.feed("ho]\nhi ", 1) + p.feed("[/Echo] ok", 2) + p.close()
    assert events == [
        VoiceStart("Echo", 6, "[Echo]", 0, (0, 1)),
        Text("Echo", "\nhi ", 6, (1,)),
        VoiceEnd("Echo", 10, "[/Echo]", (2,)),
        VoiceStart("main", 17, "", 17, (2,)),
        Text("main", " ok", 17, (2,)),
        VoiceEnd("main", 20, "", ()),
    ]


def test_partial_marker_is_held_back_then_released() -> None:
    p = VoiceParser("seed")
    assert p.feed("ab\n[Ech") == [VoiceStart("main", 0, "", 0), Text("main", "ab\n", 0)]
    assert p.emitted == 3 and p.offset == 7
    assert p.feed("x") == []  # "[Echx" could still be a lenient name
    assert p.feed(" y]") == []  # a "(" could still follow and make it a link
    assert p.feed("\n") == [
        VoiceEnd("main", 3),
        VoiceStart("Echx y", 11, "[Echx y]", 3),
        Text("Echx y", "\n", 11),
    ]
    assert p.voice == "Echx y"
    # A "]" at the very end is held back: a following "(" would make it a link.
    q = VoiceParser("seed")
    q.feed("[Echo]")
    assert q.emitted == 0
    assert q.feed("(u)")[0] == VoiceStart("main", 0, "", 0)
    assert q.close()[-1] == VoiceEnd("main", 9)


def test_marker_only_tokens_and_segment_token_ranges() -> None:
    p = VoiceParser("think")
    b = SegmentBuilder()
    for k, piece in enumerate(["<", "think", ">", "Hmm", " ok", "</", "think>", "Yes"]):
        b.add(p.feed(piece, k))
    b.add(p.close())
    assert [(s.voice, s.text, s.tokens) for s in b.segments] == [
        ("think", "Hmm ok", (0, 6)),
        ("main", "Yes", (7,)),
    ]


def test_feed_after_close_and_non_strings_are_ignored() -> None:
    p = VoiceParser("seed")
    assert p.feed("") == []
    assert p.feed(None) == []  # type: ignore[arg-type]
    p.feed("x")
    assert p.close() == [VoiceEnd("main", 1)]
    assert p.feed("more") == [] and p.close() == []


def test_work_is_linear_in_the_input() -> None:
    """Each feed rescans at most the held-back tail: total scanned <= input + pieces * bound."""
    scanned = 0

    class Counting(VoiceParser):
        def _scan(self, s: str, final: bool, out: list[Event]) -> int:
            nonlocal scanned
            scanned += len(s)
            return super()._scan(s, final, out)

    text = ("[" + "a" * 31 + "\n") * 300 + "<thin" * 300 + "[/" * 300 + "`" * 300
    for vs in ALL_SETS:
        scanned = 0
        p = Counting(vs)
        for i in range(0, len(text), 3):
            p.feed(text[i : i + 3])
        p.close()
        assert scanned <= len(text) + (len(text) // 3 + 1) * (longest_marker(vs) + 2)


# -- hostile input ----------------------------------------------------------------------------


HOSTILE = [
    "\x00[Echo]\x00\n[Echo\x00]",
    "[Echo]\r\r\n\r[Doubt]\n\r",
    "\ud800[Echo]\n[\udfff]\n[E\ud800]",  # lone surrogates
    "\u202e[Echo]\u202c\n\u2066[Doubt]\u2069 x",  # bidi overrides
    "[" * 5000,
    "<" * 5000,
    "`" * 5000 + "\n[Echo] x",
    "[/" * 3000,
    "]" * 100 + "[" + "a" * 100 + "]",
    "\n" * 100 + "[Echo]",
    "\ufeff[Echo] bom",
    "[\U0001f600] emoji",
]


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("vs", ALL_SETS, ids=lambda v: v.name)
def test_hostile_inputs_never_raise_and_match_reference(text: str, vs: VoiceSet) -> None:
    expected = reference_segments(text, vs)
    for size in (1, 7, len(text) or 1):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert run_checked(pieces, vs) == expected


@pytest.mark.parametrize("ch", ["[", "<", "`", "a", "~", "[/"])
def test_megabyte_inputs(ch: str) -> None:
    text = ch * (1_000_000 // len(ch))
    for vs in (MIXED,):
        p = VoiceParser(vs)
        events = p.feed(text) + p.close()
        assert rebuild(events) == text
        q = VoiceParser(vs)
        events = []
        for i in range(0, len(text), 4096):
            events += q.feed(text[i : i + 4096])
            assert len(q._pending) <= longest_marker(vs) + 2
        events += q.close()
        assert rebuild(events) == text
    line = "[Echo] " + "word " * 200_000 + "[/Echo] tail"
    assert pairs(line)[-1] == ("main", "tail")
