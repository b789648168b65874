"""Voice parser properties under Hypothesis: split invariance, losslessness, bounded tail, tokens."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_parse import ALL_SETS, reference_segments, run_checked

from thoughtform.parse import VoiceParser, parse_text, rebuild
from thoughtform.voices import VoiceSet

# Pieces the texts are built from: markers of every kind (declared, aliased, unknown, wrong case,
# too long, half-written), links, colons, fences, line ends, and hostile Unicode.
ATOMS = [
    "[Echo]",
    "[echo]",
    "[ECHO]:",
    "[/Echo]",
    "[/echo]",
    "[Doubt]",
    "[/Doubt]",
    "[Foo]",
    "[/Foo]",
    "[Main]",
    "[/main]",
    "[E]",
    "[echo-voice]",
    "[/e]",
    "[Echo](u)",
    "[/Echo](",
    "[Мысль]",
    "[Ωmega x]",
    "[a b ]",
    "[1x]",
    "[e\u0301]",
    "[" + "y" * 32 + "]",
    "[" + "y" * 33 + "]",
    "[/" + "y" * 32 + "]",
    "<think>",
    "</think>",
    "<THINK>",
    "</Think>",
    "<reasoning>",
    "</reasoning>",
    "<thin",
    "<thin\u212a>",
    "[Ech",
    "[/",
    "[",
    "]",
    "<",
    ">",
    "/",
    "(",
    ":",
    "\n",
    "\r\n",
    "\r",
    " ",
    "\t",
    "```",
    "~~~",
    "````",
    "``",
    "`",
    "~",
    "abc",
    "Я не знаю",
    "\u202e",
    "\x00",
    "\ud800",
    "\U0001f600",
    "\ufeff",
]

texts = st.lists(
    st.one_of(
        st.sampled_from(ATOMS),
        st.text(st.characters(codec=None, exclude_categories=()), max_size=6),
    ),
    max_size=30,
).map("".join)
voice_sets = st.sampled_from(ALL_SETS)
starts = st.sampled_from([None, "think", "Echo", "Foo"])
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cut(text: str, points: list[int]) -> list[str]:
    """``text`` cut at the given points (clamped and sorted)."""
    ps = sorted({min(max(p, 0), len(text)) for p in points})
    return [text[a:b] for a, b in zip([0, *ps], [*ps, len(text)], strict=True)]


@FAST
@given(
    text=texts, vs=voice_sets, starts_in=starts, points=st.lists(st.integers(0, 400), max_size=12)
)
@example(text="[Ec\nho]", vs=ALL_SETS[0], starts_in=None, points=[3])
@example(text="```\n[Echo]\n``` x\n```\n[Echo] y", vs=ALL_SETS[0], starts_in=None, points=[2, 17])
def test_any_chunking_gives_the_same_segments(
    text: str, vs: VoiceSet, starts_in: str | None, points: list[int]
) -> None:
    """(a) identical segments however split, (b) lossless, (d) bounded tail, (e) token indices."""
    whole = run_checked([text], vs, starts_in)
    assert run_checked(cut(text, points), vs, starts_in) == whole
    assert run_checked(list(text), vs, starts_in) == whole


@FAST
@given(text=texts, vs=voice_sets, starts_in=starts)
def test_matches_the_reference_parser(text: str, vs: VoiceSet, starts_in: str | None) -> None:
    got = [
        (s.voice, s.text, s.start, s.end, s.marker, s.close_marker)
        for s in parse_text(text, vs, starts_in)
    ]
    assert got == reference_segments(text, vs, starts_in)


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec=None, exclude_categories=()), max_size=200), vs=voice_sets)
def test_never_raises_on_any_string(text: str, vs: VoiceSet) -> None:
    """(c) arbitrary code points (surrogates, controls, unassigned) fed whole and char by char."""
    p = VoiceParser(vs)
    events = [e for ch in text for e in p.feed(ch)] + p.close()
    assert rebuild(events) == text
    q = VoiceParser(vs)
    assert rebuild(q.feed(text) + q.close()) == text
