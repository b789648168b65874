"""The conductor on a small hand-made vocabulary: bans, forcing, structure, plans (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thoughtform.parse import VoiceParser
from thoughtform.steer import (
    Conductor,
    SteerError,
    SteerPlan,
    Structure,
    Vocab,
    parse_order,
    parse_voice_sampling,
    structure_gbnf,
)
from thoughtform.voices import Voice, VoiceSet, resolve_voice_set

# A toy vocabulary: whole words, markers split the way SmolLM2 splits them ("[", "Dou", "bt", "]").
PIECES = [
    "<eos>",
    "[",
    "E",
    "cho",
    "Dou",
    "bt",
    "]",
    "\n",
    "\n\n",
    " hello",
    " world",
    "P",
    "ulse",
    " [",
    "[/",
    "/",
    "D",
    "ouble",
    "<",
    "think",
    ">",
    "Sh",
    "ift",
]
# Single letters, so every seed voice's marker can be spelled.
PIECES += [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in PIECES]
IDS = {p: i for i, p in enumerate(PIECES)}


def tokenize(text: str) -> list[int]:
    """Greedy longest-match over the toy vocabulary."""
    out = []
    i = 0
    while i < len(text):
        best = max((p for p in PIECES[1:] if text.startswith(p, i)), key=len, default=None)
        assert best is not None, text[i:]
        out.append(IDS[best])
        i += len(best)
    return out


@pytest.fixture
def vocab() -> Vocab:
    return Vocab([p.encode() for p in PIECES], [0], tokenize)


VOICES = resolve_voice_set("seed")


def drive(c: Conductor, ids: list[int]) -> None:
    """Feed tokens as Generation would (text + parser events)."""
    parser = getattr(c, "_test_parser", None)
    if parser is None:
        parser = VoiceParser(c.voices)
        c._test_parser = parser  # type: ignore[attr-defined]
    for i in ids:
        c.feed(PIECES[i], parser.feed(PIECES[i]))


def test_mute_bans_only_the_muted_marker_and_only_where_it_can_start(vocab: Vocab) -> None:
    c = Conductor(VOICES, SteerPlan(mute=frozenset({"Doubt"})))
    c.bind(vocab)
    st = c.step()
    banned = set(st.ban.tolist()) if st.ban is not None else set()
    # At a line start "[" may still open other voices: allowed; "[D..." cannot be banned yet
    # because the token is only "[".
    assert IDS["["] not in banned
    drive(c, [IDS["["]])
    banned = set(c.step().ban.tolist())  # type: ignore[union-attr]
    assert IDS["Dou"] in banned and IDS["D"] in banned
    assert IDS["E"] not in banned and IDS["P"] not in banned
    # Mid-line, "[" + "Dou" is no marker: nothing is banned there.
    c2 = Conductor(VOICES, SteerPlan(mute=frozenset({"Doubt"})))
    c2.bind(vocab)
    c2.step()
    drive(c2, [IDS[" hello"], IDS["["]])
    assert c2.step().ban is None or IDS["Dou"] not in set(c2.step().ban.tolist())  # type: ignore[union-attr]


def test_mute_covers_aliases_and_tag_voices(vocab: Vocab) -> None:
    vs = VoiceSet(
        "t",
        voices=(
            Voice("Doubt", aliases=("Double",)),
            Voice("Echo"),
            Voice("think", syntax="tag"),
        ),
    )
    c = Conductor(vs, SteerPlan(mute=frozenset({"Doubt", "think"})))
    c.bind(vocab)
    c.step()
    drive(c, [IDS["["]])
    banned = set(c.step().ban.tolist())  # type: ignore[union-attr]
    assert IDS["D"] in banned  # "[d" can only become [Doubt] or [Double]
    c3 = Conductor(vs, SteerPlan(mute=frozenset({"think"})))
    c3.bind(vocab)
    c3.step()
    drive(c3, [IDS[" hello"], IDS["<"]])
    assert IDS["think"] in set(c3.step().ban.tolist())  # type: ignore[union-attr]


def test_next_voice_is_forced_at_reply_start_and_recorded(vocab: Vocab) -> None:
    c = Conductor(VOICES, SteerPlan(next_voice="pulse"))  # any case: declared spelling used
    c.bind(vocab)
    seen: list[list[int]] = []

    def score(seqs):  # type: ignore[no-untyped-def]
        seen.extend(list(s) for s in seqs)
        return [math.log(0.1)] * len(seqs)

    forced = []
    for _ in range(4):
        st = c.step(score)
        assert st.force is not None
        forced.append(st.force)
        drive(c, [st.force])
    assert "".join(PIECES[i] for i in forced) == "[Pulse]"
    assert c.step(score).force == IDS["\n"]
    assert seen and len(seen) == len(VOICES.voices)  # every voice's marker scored once
    assert c.choices[0].forced and c.choices[0].token == 0


def test_next_voice_set_live_replaces_the_marker_the_model_starts(vocab: Vocab) -> None:
    c = Conductor(VOICES, SteerPlan())
    c.bind(vocab)
    c.step()
    drive(c, tokenize("[Echo]\n hello\n\n"))
    c.set_next_voice("Shift")
    st = c.step()
    assert st.intercept
    tok, forced = c.intercept(IDS["["])
    assert forced and tok == IDS["["]
    out = [tok]
    drive(c, [tok])
    while True:
        st = c.step()
        if st.force is None:
            break
        out.append(st.force)
        drive(c, [st.force])
    assert "".join(PIECES[i] for i in out) == "[Shift]\n"
    assert c.voice == "Shift"


def test_per_voice_sampling_switches_at_the_marker(vocab: Vocab) -> None:
    plan = SteerPlan(voice_sampling={"Echo": (0.0, 0.5)})
    c = Conductor(VOICES, plan, temperature=0.9, top_p=0.9)
    c.bind(vocab)
    assert (c.step().temperature, c.step().top_p) == (0.9, 0.9)
    drive(c, tokenize("[Echo]\n hello"))
    st = c.step()
    assert (st.temperature, st.top_p) == (0.0, 0.5)
    drive(c, tokenize("\n\n[Doubt]\n world"))
    assert c.step().temperature == 0.9


def test_structure_forces_a_first_voice_and_bans_early_end_and_empty_blocks(
    vocab: Vocab,
) -> None:
    c = Conductor(VOICES, SteerPlan(structure=Structure(first="Echo")), seed=3)
    c.bind(vocab)
    out = []
    st = c.step()
    while st.force is not None:
        out.append(st.force)
        drive(c, [st.force])
        st = c.step()
    assert "".join(PIECES[i] for i in out) == "[Echo]\n"
    banned = set(st.ban.tolist())  # type: ignore[union-attr]
    assert 0 in banned  # no end before two blocks
    assert IDS["["] in banned  # no marker before the block says something
    assert IDS["[/"] in banned  # close markers never
    drive(c, [IDS[" hello"], IDS["\n\n"]])
    st = c.step()
    assert IDS["["] not in set(st.ban.tolist())  # type: ignore[union-attr]
    # The model starts a marker: the conductor picks another voice (never Echo again).
    tok, forced = c.intercept(IDS["["])
    assert forced
    out = [tok]
    drive(c, [tok])
    st = c.step()
    while st.force is not None:
        out.append(st.force)
        drive(c, [st.force])
        st = c.step()
    text = "".join(PIECES[i] for i in out)
    assert text.startswith("[") and text.endswith("]\n") and text != "[Echo]\n"


def test_structure_block_budget_forces_a_boundary(vocab: Vocab) -> None:
    c = Conductor(VOICES, SteerPlan(structure=Structure(block_tokens=3)), seed=0)
    c.bind(vocab)
    st = c.step()
    while st.force is not None:
        drive(c, [st.force])
        st = c.step()
    drive(c, [IDS[" hello"], IDS[" world"], IDS[" hello"]])
    st = c.step()
    assert st.force == IDS["\n\n"]


def test_structure_ends_after_max_blocks(vocab: Vocab) -> None:
    c = Conductor(VOICES, SteerPlan(structure=Structure(max_blocks=2)), seed=0)
    c.bind(vocab)
    drive(c, tokenize("[Echo]\n hello\n\n[Doubt]\n world\n\n"))
    c._started = True
    tok, forced = c.intercept(IDS["["])
    assert forced and tok == 0  # the end of generation instead of a third block


def test_plan_checks_names_and_round_trips() -> None:
    plan = SteerPlan(
        next_voice="echo",
        mute=frozenset({"doubt"}),
        voice_sampling={"PULSE": (0.0, None)},
        structure=Structure(first="shift", never_first=("echo",)),
    ).resolved(VOICES)
    assert plan.next_voice == "Echo" and plan.mute == {"Doubt"}
    assert plan.structure is not None and plan.structure.first == "Shift"
    assert SteerPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(SteerError, match="unknown voice 'Nobody'"):
        SteerPlan(mute=frozenset({"Nobody"})).resolved(VOICES)


def test_option_parsers() -> None:
    assert parse_voice_sampling(["Doubt=0.9,0.8", "Pulse=0"]) == {
        "Doubt": (0.9, 0.8),
        "Pulse": (0.0, None),
    }
    for bad in ["Doubt", "=1", "Doubt=x", "Doubt=9", "Doubt=1,0"]:
        with pytest.raises(SteerError):
            parse_voice_sampling([bad])
    st = parse_order(["first=Echo", "never-first=Doubt,Pulse", "max-per-voice=1"])
    assert st.first == "Echo" and st.never_first == ("Doubt", "Pulse") and st.max_per_voice == 1
    for bad in ["first", "colour=red", "max-per-voice=x", "min-blocks=0"]:
        with pytest.raises(SteerError):
            parse_order([bad])
    with pytest.raises(SteerError, match="smaller"):
        parse_order(["min-blocks=3", "max-blocks=2"])


def test_gbnf_lists_every_allowed_order() -> None:
    vs = VoiceSet("t", voices=(Voice("A"), Voice("B"), Voice("C")))
    g = structure_gbnf(vs, Structure(min_blocks=2, max_blocks=3), mute=["C"])
    assert g.startswith("root ::= b1-v0 | b1-v1")
    assert '"[C]' not in g  # muted
    assert "b2-v0" in g and "b3-v1" in g
    assert 'b1-v0 ::= "[A]\\n" body ("\\n\\n" (b2-v1))' in g  # never A twice; 2nd block required
    with pytest.raises(SteerError):
        structure_gbnf(vs, Structure(), mute=["B", "C"])


def test_bans_cost_a_lookup_after_the_first_scan(vocab: Vocab) -> None:
    c = Conductor(VOICES, SteerPlan(mute=frozenset({"Echo"})))
    c.bind(vocab)
    c.step()
    a = c._mute_bans(frozenset({"Echo"}))
    b = c._mute_bans(frozenset({"Echo"}))
    assert isinstance(a, np.ndarray) and np.array_equal(a, b)
    assert any(isinstance(k, tuple) and k[0] == "line" for k in vocab._cache)


def test_voice_vectors_follow_the_parsed_voice(vocab: Vocab) -> None:
    plan = SteerPlan(vectors={"Doubt": 1.5}, whole_vectors={"Pulse": 0.5})
    c = Conductor(VOICES, plan.resolved(VOICES))
    c.bind(vocab)
    assert c.step().vector == (("Pulse", 0.5),)
    drive(c, tokenize("[Doubt]"))
    assert c.step().vector == (("Pulse", 0.5),)  # the marker is not confirmed yet
    drive(c, tokenize("\n hello"))
    assert c.step().vector == (("Pulse", 0.5), ("Doubt", 1.5))
    drive(c, tokenize("\n\n[Echo]\n world"))
    assert c.step().vector == (("Pulse", 0.5),)  # Echo has no vector: Doubt's is cleared
