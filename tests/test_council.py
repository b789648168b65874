"""The council: policies on a scripted backend, the user as a voice, stop mid-turn, turn
cutting, the council trace, and resonance measures on hand-built traces."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from council_scripted import ScriptedBackend, as_speaker, speaker_of

from thoughtform.backends.base import GenerationRequest, Sampling
from thoughtform.council import (
    USER,
    Council,
    CouncilError,
    Turn,
    marker_leaks,
    next_speaker_context,
    surprisal_fn,
    transcript,
    turn_messages,
    turns_of,
    wants_persona,
)
from thoughtform.resonance import (
    attention_scores,
    counterfactual_scores,
    echo_scores,
    text_units,
    voice_matrix,
)
from thoughtform.trace import AttentionSummary, TokenRecord, Trace, load_trace, parse_trace_lines
from thoughtform.voices import PRESETS, voice_set_from_dict

SEED = PRESETS["seed"]
MEMBERS = ["Echo", "Doubt", "Pulse", "Shift"]


def speakers(c: Council) -> list[str | None]:
    return [t.voice for t in c.turns]


def run_all(c: Council, n: int) -> list[Turn]:
    ended = [ev.turn for ev in c.run(n) if ev.kind == "end"]
    return ended


# ------------------------------------------------------------------------------ policies


def test_list_speaks_each_member_once_per_user_message() -> None:
    c = Council(SEED, MEMBERS, ScriptedBackend(as_speaker()), "list")
    c.say("Is the sea blue?")
    ended = run_all(c, 10)
    assert [t.voice for t in ended] == MEMBERS
    assert all(t.by == "rule" and t.policy == "list" for t in ended)
    c.say("And now?")
    assert [t.voice for t in run_all(c, 2)] == ["Echo", "Doubt"]


def test_round_robin_repeats_skips_muted_and_obeys_force() -> None:
    c = Council(SEED, MEMBERS, ScriptedBackend(as_speaker()), "round-robin", muted=["Pulse"])
    c.say("hi")
    forced = False
    for ev in c.run(6):
        if ev.kind == "end" and ev.turn.index == 2 and not forced:
            c.force_next("Shift")  # at any time: here between turns, from the event loop
            forced = True
    got = speakers(c)[1:]
    assert got == ["Echo", "Doubt", "Shift", "Shift", "Echo", "Doubt"]
    assert c.turns[3].by == "forced"
    assert "Pulse" not in got
    with pytest.raises(CouncilError, match="muted"):
        c.force_next("Pulse")
    with pytest.raises(CouncilError, match="not a member"):
        c.force_next("Inner")


def test_natural_mention_first_last_speaker_barred() -> None:
    # Talkativeness 0: only mentions (and the fallback) activate anyone.
    reply = {
        "Echo": "[Echo]\nPulse, what do you feel? And Echo again.",
        "Pulse": "[Pulse]\nA breath.",
    }

    def script(req: GenerationRequest, i: int) -> str:
        v = speaker_of(req)
        return reply.get(v, f"[{v}]\nnothing here")

    c = Council(
        SEED,
        MEMBERS,
        ScriptedBackend(script),
        "natural",
        seed=3,
        talkativeness={m: 0.0 for m in MEMBERS},
    )
    c.say("Echo, start please.")
    run_all(c, 2)
    # The user's message names Echo; Echo's turn names Pulse (and itself, barred).
    assert speakers(c)[1:] == ["Echo", "Pulse"]
    # Nobody named and nobody talkative: one random member, never the last speaker.
    run_all(c, 1)
    assert c.turns[-1].voice in {"Echo", "Doubt", "Shift"}


def test_natural_talkative_members_all_speak_once_in_shuffled_order() -> None:
    c = Council(
        SEED, MEMBERS, ScriptedBackend(as_speaker("plain words")), "natural", seed=11,
        talkativeness={m: 1.0 for m in MEMBERS},
    )  # fmt: skip
    c.say("hello")
    run_all(c, 4)
    got = speakers(c)[1:]
    assert sorted(got) == sorted(MEMBERS)  # type: ignore[type-var]
    c2 = Council(
        SEED, MEMBERS, ScriptedBackend(as_speaker("plain words")), "natural", seed=11,
        talkativeness={m: 1.0 for m in MEMBERS},
    )  # fmt: skip
    c2.say("hello")
    run_all(c2, 4)
    assert speakers(c2) == speakers(c)  # seeded


def test_model_policy_probs_renormalised_over_eligible_and_recorded() -> None:
    lp = {"[Echo]": math.log(0.1), "[Doubt]": math.log(0.3), "[Pulse]": math.log(0.05)}
    lp["[Shift]"] = math.log(0.05)

    def scores(req: GenerationRequest, texts: Sequence[str], prefix: str) -> list[float]:
        return [lp[t] for t in texts]

    b = ScriptedBackend(as_speaker(), scores=scores)
    c = Council(SEED, MEMBERS, b, "model", model_choice="argmax", muted=["Pulse"])
    c.say("Why?")
    run_all(c, 2)
    first = c.turns[1]
    assert first.voice == "Doubt" and first.by == "model"
    assert set(first.probs) == {"Echo", "Doubt", "Shift"}  # muted Pulse is not eligible
    assert math.isclose(sum(first.probs.values()), 1.0)
    assert math.isclose(first.probs["Doubt"], 0.3 / 0.45)
    # The last speaker (Doubt) is barred: Echo has the most left.
    second = c.turns[2]
    assert second.voice == "Echo" and set(second.probs) == {"Echo", "Shift"}
    # What was scored: the markers, continuing the transcript rendered in markers.
    req, texts, prefix = b.scored[1]
    assert texts == ["[Echo]", "[Shift]"]
    assert prefix == "[Doubt]\nI am Doubt, speaking.\n\n"
    assert [m.role for m in req.messages] == ["user"]
    # The probabilities are in the trace's turn records.
    rec = next(t for t in c.trace.turns if t["index"] == 1)
    assert rec["by"] == "model" and math.isclose(sum(rec["probs"].values()), 1.0, abs_tol=1e-5)


def test_model_policy_sampling_is_seeded() -> None:
    def scores(req: GenerationRequest, texts: Sequence[str], prefix: str) -> list[float]:
        return [0.0] * len(texts)

    runs = []
    for _ in range(2):
        c = Council(SEED, MEMBERS, ScriptedBackend(as_speaker(), scores=scores), "model", seed=5)
        c.say("x")
        run_all(c, 6)
        runs.append(speakers(c))
        assert all(math.isclose(sum(t.probs.values()), 1.0) for t in c.turns[1:])
    assert runs[0] == runs[1]
    assert len(set(runs[0][1:])) > 1


class _NoScores(ScriptedBackend):
    score_continuations = None  # type: ignore[assignment]


def test_model_policy_without_a_scorer_is_a_clear_error() -> None:
    with pytest.raises(CouncilError, match="cannot score"):
        Council(SEED, MEMBERS, _NoScores(as_speaker()), "model")


def test_manual_policy_asks_the_chooser() -> None:
    asked: list[list[str]] = []
    picks = iter(["Shift", "Echo", None])

    def chooser(council: Council, eligible: list[str]) -> str | None:
        asked.append(eligible)
        return next(picks)

    c = Council(SEED, MEMBERS, ScriptedBackend(as_speaker()), "manual", chooser=chooser)
    c.say("go")
    run_all(c, 5)
    assert speakers(c)[1:] == ["Shift", "Echo"]
    assert all(t.by == "user" for t in c.turns)
    assert asked[0] == MEMBERS
    with pytest.raises(CouncilError, match="chooser"):
        Council(SEED, MEMBERS, ScriptedBackend(as_speaker()), "manual")


def test_bad_members_and_policy() -> None:
    b = ScriptedBackend(as_speaker())
    with pytest.raises(CouncilError, match="unknown voice 'Nobody'"):
        Council(SEED, ["Echo", "Nobody"], b)
    with pytest.raises(CouncilError, match="policy 'loud'"):
        Council(SEED, MEMBERS, b, "loud")
    with pytest.raises(CouncilError, match="twice"):
        Council(SEED, ["Echo", "echo"], b)
    c = Council(SEED, ["Echo"], b, muted=["Echo"])
    with pytest.raises(CouncilError, match="every member is muted"):
        run_all(c, 1)


# ---------------------------------------------------------------------------- the user


def test_user_speaks_as_self_and_as_a_voice() -> None:
    b = ScriptedBackend(as_speaker())
    c = Council(SEED, MEMBERS, b, "round-robin")
    c.say("Is it late?")
    t = c.say("It is never late.", as_voice="doubt")
    assert (t.voice, t.by, t.source, t.text) == ("Doubt", "user", "user", "It is never late.")
    run_all(c, 1)
    req = b.requests[0]
    assert req.messages[0].role == "system" and "You are Echo" in req.messages[0].content
    assert "Echo repeats and reflects" in req.messages[0].content  # the persona
    assert [(m.role, m.content) for m in req.messages[1:]] == [
        ("user", "Is it late?"),
        ("assistant", "[Doubt]\nIt is never late."),
    ]
    assert c.turns[2].voice == "Echo"
    # The next prompt holds both voice turns, labelled by speaker, in one assistant message.
    run_all(c, 1)
    assert b.requests[1].messages[-1].content == (
        "[Doubt]\nIt is never late.\n\n[Echo]\nI am Echo, speaking."
    )
    with pytest.raises(CouncilError, match="speak as"):
        c.say("x", as_voice="Nobody")


def test_posts_while_running_join_after_the_turn() -> None:
    b = ScriptedBackend(as_speaker())
    c = Council(SEED, MEMBERS, b, "round-robin")
    c.say("first")
    kinds = []
    for ev in c.run(2):
        kinds.append((ev.kind, ev.turn.index, ev.turn.voice))
        if ev.kind == "text" and ev.turn.index == 1 and len(kinds) == 2:
            c.post("a word from me")  # from the event loop, mid-turn
            c.post("and as Doubt", as_voice="Doubt")
    assert [(t.voice, t.source, t.text) for t in c.turns] == [
        (None, "user", "first"),
        ("Echo", "model", "I am Echo, speaking."),
        (None, "user", "a word from me"),
        ("Doubt", "user", "and as Doubt"),
        ("Doubt", "model", "I am Doubt, speaking."),
    ]
    assert ("turn", 2, None) in kinds and ("end", 3, "Doubt") in kinds
    # The generated turn after the posts saw them.
    assert b.requests[1].messages[-2:][0].content == "a word from me"
    with pytest.raises(CouncilError):
        c.post("x", as_voice="Nobody")


def test_the_voices_model_gets_no_persona() -> None:
    plain = ScriptedBackend(as_speaker())
    voices_model = ScriptedBackend(lambda r, i: "[Doubt]\nIs it?", model_name="embedded-voices")
    assert wants_persona(plain) and not wants_persona(voices_model)
    c = Council(SEED, MEMBERS, plain, "round-robin", backends={"Doubt": voices_model})
    c.say("hi")
    run_all(c, 2)
    assert plain.requests[0].messages[0].role == "system"
    assert [m.role for m in voices_model.requests[0].messages] == ["user", "assistant"]
    assert c.turns[2].text == "Is it?"
    # The user's own system text still comes first.
    msgs = turn_messages(SEED, MEMBERS, "Doubt", c.turns, system="Be brief.", persona=False)
    assert (msgs[0].role, msgs[0].content) == ("system", "Be brief.")


def test_per_member_sampling_and_backends() -> None:
    vs = voice_set_from_dict(
        {"voices": [{"name": "Echo"}, {"name": "Doubt", "temperature": 0.2, "top_p": 0.5}]}
    )
    shared = ScriptedBackend(as_speaker())
    own = ScriptedBackend(as_speaker("from my own server"))
    c = Council(
        vs,
        ["Echo", "Doubt"],
        shared,
        "round-robin",
        backends={"Doubt": own},
        sampling=Sampling(temperature=0.9, max_tokens=50, seed=7),
    )
    c.say("x")
    run_all(c, 2)
    assert shared.requests[0].sampling.temperature == 0.9
    assert own.requests[0].sampling.temperature == 0.2
    assert own.requests[0].sampling.top_p == 0.5
    assert own.requests[0].sampling.seed == 7 + 2  # seed + turn index: turns differ
    assert c.turns[2].text == "from my own server" and c.turns[2].model == "script"


# ------------------------------------------------------------------------------ cutting


@pytest.mark.parametrize(
    ("reply", "text", "echoed", "skipped", "finish"),
    [
        ("[Doubt]\nIs it?", "Is it?", 1, 0, "stop"),
        ("Doubt: Is it?", "Is it?", 1, 0, "stop"),
        ("[Doubt]\nDoubt: is it?", "is it?", 2, 0, "stop"),
        ("Is it?\n\n[Echo]\nIt is.", "Is it?", 0, 0, "cut"),
        ("[Echo]\nIt is.\n\n[Doubt]\nIs it?\n\n[Pulse]\nbeat", "Is it?", 1, 1, "cut"),
        ("[Doubt]\nIs it? [Echo] said so.", "Is it? [Echo] said so.", 1, 0, "stop"),
        ("Doubtless it is.", "Doubtless it is.", 0, 0, "stop"),
        ("Dou", "Dou", 0, 0, "stop"),
        ("[Doubt]\nIs it?\n[/Doubt]\nafter", "Is it?", 1, 0, "cut"),
    ],
)
def test_turn_text_is_cut_and_markers_stripped(
    reply: str, text: str, echoed: int, skipped: int, finish: str
) -> None:
    c = Council(SEED, MEMBERS, ScriptedBackend(lambda r, i: reply), "round-robin")
    c.say("?")
    streamed = []
    for ev in c.step("Doubt"):
        if ev.kind == "text":
            streamed.append(ev.delta)
    t = c.turns[-1]
    assert (t.text, t.echoed, t.skipped, t.finish) == (text, echoed, skipped, finish)
    assert "".join(streamed).strip() == text  # what streamed is exactly the turn's text
    assert "[Doubt]" not in t.text


def test_marker_leaks() -> None:
    assert marker_leaks("fine [Echo] and [/pulse]", SEED, "Doubt") == ["Echo", "Pulse"]
    assert marker_leaks("I, [Doubt], doubt", SEED, "Doubt") == []
    assert marker_leaks("[Echo](link)", SEED, None) == ["Echo"]


# --------------------------------------------------------------------- stop and the trace


def test_stop_mid_turn_keeps_finished_turns_and_the_partial_one(tmp_path: Path) -> None:
    long = " ".join(f"w{i}" for i in range(200))
    b = ScriptedBackend(as_speaker(long), delay=0.001)
    path = tmp_path / "council.jsonl"
    c = Council(SEED, MEMBERS, b, "round-robin", trace_path=path)
    c.say("go")
    n_text = 0
    seen_end = 0
    for ev in c.run(4):
        if ev.kind == "end":
            seen_end += 1
        if ev.kind == "text" and ev.turn.index == 1:
            n_text += 1
            if n_text == 10:
                c.stop()
    assert len(c.turns) == 2 and seen_end == 1
    t = c.turns[1]
    assert t.finish == "cancelled" and t.interrupted
    assert t.text.startswith("w0 w1") and len(t.text.split()) < 200
    c.close("cancelled")
    back = load_trace(path)
    turns = turns_of(back)
    assert [x.voice for x in turns] == [None, "Echo"]
    assert turns[1].interrupted and turns[1].text == t.text
    assert all(tok.turn == 1 for tok in back.tokens)
    # A new run goes on after a stop.
    run_all(c, 1)
    assert c.turns[-1].voice == "Doubt" and c.turns[-1].finish == "length"  # 96 tokens a turn


def test_stop_from_another_thread() -> None:
    long = " ".join(f"w{i}" for i in range(5000))
    c = Council(SEED, MEMBERS, ScriptedBackend(as_speaker(long), delay=0.002), "round-robin")
    c.say("go")
    threading.Timer(0.2, c.stop).start()
    run_all(c, 3)
    assert len(c.turns) == 2 and c.turns[1].interrupted


def test_council_trace_records_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    c = Council(SEED, MEMBERS, ScriptedBackend(as_speaker()), "round-robin", trace_path=path)
    c.say("Why?")
    run_all(c, 2)
    c.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    kinds = [__import__("json").loads(x)["type"] for x in lines]
    # meta, the user's turn (opened and closed), then each turn: turn, its tokens, turn_end.
    assert kinds[:3] == ["meta", "turn", "turn_end"]
    assert kinds[3] == "turn" and kinds[-1] == "end"
    i_end = kinds.index("turn_end", 3)
    assert set(kinds[4:i_end]) == {"token"}
    back = load_trace(path)
    assert back.turns == c.trace.turns
    assert back.to_jsonl() == c.trace.to_jsonl()  # in-memory and streamed files agree
    assert [t.turn for t in back.tokens] == [t.turn for t in c.trace.tokens]
    assert {t.turn for t in back.tokens} == {1, 2}
    assert back.meta["kind"] == "council" and back.meta["members"] == MEMBERS
    # Going on from the trace.
    c2 = Council.from_trace(back, ScriptedBackend(as_speaker()))
    run_all(c2, 1)
    assert [t.voice for t in c2.turns] == [None, "Echo", "Doubt", "Pulse"]  # goes on in order
    assert c2.turns[3].start == len(back.tokens)


def test_trace_turn_records_in_plain_traces() -> None:
    tok = TokenRecord(index=0, text="a", turn=3)
    assert TokenRecord.from_dict(tok.to_dict()).turn == 3
    assert "turn" not in TokenRecord(index=0, text="a").to_dict()
    assert TokenRecord.from_dict({"index": 0, "text": "a", "turn": True}).turn is None
    bad = '{"type":"meta","schema":1}\n{"type":"turn_end","index":4}\n'
    errors: list[str] = []
    parse_trace_lines(bad, "x.jsonl", errors)
    assert errors == ["x.jsonl:2: turn_end record: no turn 4 was opened"]
    torn = '{"type":"meta","schema":1}\n{"type":"turn","index":0,"voice":"Echo"}\n'
    t = parse_trace_lines(torn)
    assert turns_of(t)[0].interrupted


# ----------------------------------------------------------------------- prompt helpers


def test_transcript_and_next_speaker_context() -> None:
    turns = [
        Turn(0, None, "hello"),
        Turn(1, "Echo", "hello, you said"),
        Turn(2, None, "yes"),
        Turn(3, "Doubt", "did you?"),
    ]
    assert transcript(turns, SEED) == "[Echo]\nhello, you said\n\n[Doubt]\ndid you?"
    msgs, prefix = next_speaker_context(SEED, turns)
    assert [(m.role, m.content) for m in msgs] == [
        ("user", "hello"),
        ("assistant", "[Echo]\nhello, you said"),
        ("user", "yes"),
    ]
    assert prefix == "[Doubt]\ndid you?\n\n"
    assert next_speaker_context(SEED, turns[:3])[1] == ""


# ---------------------------------------------------------------------------- resonance


def hand_turns() -> list[Turn]:
    return [
        Turn(0, None, "Why is the sky blue?"),
        Turn(1, "Echo", "The sky blue, you said: the sky blue."),
        Turn(2, "Doubt", "Is the sky blue at night, or only grey?"),
        Turn(3, "Pulse", "Grey breath, night cold."),
    ]


def test_text_units() -> None:
    # stems ("blue" -> "blu", "skies" -> "sky"); phrases never span punctuation
    assert text_units("The sky is blue, blue skies.") == {"sky", "blu", "blu sky"}
    assert text_units("Grey breath, night cold.") == {
        "grey", "breath", "night", "cold", "grey breath", "night cold"
    }  # fmt: skip


def test_echo_scores_credit_the_turn_that_used_a_unit_first() -> None:
    s = echo_scores(hand_turns())
    # Echo: {sky, blue, said, sky blue}: sky, blue and "sky blue" came from the user.
    assert s[1] == {0: pytest.approx(3 / 4)}
    # Doubt: {sky, blue, night, grey, sky blue}: 3 from the user, none first said by Echo.
    assert s[2] == {0: pytest.approx(3 / 5), 1: 0.0}
    # Pulse: {grey, breath, night, cold, grey breath, night cold}: grey and night from Doubt.
    assert s[3] == {0: 0.0, 1: 0.0, 2: pytest.approx(2 / 6)}
    assert 0 not in s  # the user's own turn draws on nothing
    m = voice_matrix(hand_turns(), s)
    assert m.labels == (USER, "Echo", "Doubt", "Pulse")
    assert m.get("Pulse", "Doubt") == pytest.approx(1 / 3)
    assert m.get("Pulse", "Echo") == 0.0
    assert m.get("Echo", "Doubt") is None  # Echo spoke before Doubt: no pair
    assert m.get("Doubt", USER) == pytest.approx(0.6)
    assert m.counts[3] == (1, 1, 1, 0)


def test_voice_matrix_means_over_turn_pairs() -> None:
    turns = [Turn(0, "Echo", "a"), Turn(1, "Doubt", "b"), Turn(2, "Echo", "c"), Turn(3, "Doubt")]
    scores = {1: {0: 0.2}, 2: {1: 0.4}, 3: {0: 0.1, 1: 0.0, 2: 0.5}}
    m = voice_matrix(turns, scores, labels=["Echo", "Doubt"])
    assert m.get("Doubt", "Echo") == pytest.approx((0.2 + 0.1 + 0.5) / 3)
    assert m.get("Echo", "Doubt") == pytest.approx(0.4)
    assert m.get("Doubt", "Doubt") == pytest.approx(0.0)
    assert m.get("Echo", "Echo") is None
    assert m.counts == ((0, 1), (3, 1))


def test_attention_scores_on_a_hand_built_trace() -> None:
    turns = hand_turns()[:3]
    # Turn 2's prompt holds turn 0 at positions [2, 6) and turn 1 at [8, 14).
    turns[2].context = [[0, 2, 6], [1, 8, 14]]
    att_a = AttentionSummary(
        segment_mass=[[], []],
        top=[[(3, 0.5), (9, 0.2), (20, 0.3)], [(10, 0.6), (2, 0.1)]],
        prompt_tokens=16,
    )
    att_b = AttentionSummary(segment_mass=[[]], top=[[(13, 1.0)]], prompt_tokens=16)
    trace = Trace(
        tokens=[
            TokenRecord(index=0, text="x", turn=1, attention=att_b),  # no spans: left out
            TokenRecord(index=1, text="y", turn=2, attention=att_a),
            TokenRecord(index=2, text="z", turn=2, attention=att_b),
        ]
    )
    s = attention_scores(trace, turns)
    assert list(s) == [2]
    # token y: layer 0 -> turn0 .5, turn1 .2; layer 1 -> turn0 .1, turn1 .6 (means .3, .4);
    # token z: turn1 1.0 -> over the two tokens turn0 .15, turn1 .7
    assert s[2] == {0: pytest.approx(0.15), 1: pytest.approx(0.7)}
    s1 = attention_scores(trace, turns, layers=(1, 2))
    assert s1[2] == {0: pytest.approx(0.05), 1: pytest.approx(0.3)}


def test_counterfactual_scores_cache_and_sign() -> None:
    turns = hand_turns()
    calls: list[tuple[int, frozenset[int]]] = []
    # Removing turn 2 makes turn 3 (which echoes it) much less expected.
    table = {(3, frozenset()): 2.0, (3, frozenset({2})): 3.5, (3, frozenset({1})): 2.1}

    def surprisal(j: int, removed: frozenset[int]) -> float:
        calls.append((j, removed))
        return table.get((j, removed), 1.0)

    cache: dict[tuple[int, frozenset[int]], float] = {}
    s = counterfactual_scores(turns, surprisal, cache)
    assert s[3] == {0: pytest.approx(-1.0), 1: pytest.approx(0.1), 2: pytest.approx(1.5)}
    assert set(s) == {1, 2, 3}
    n = len(calls)
    assert n == len(set(calls))  # each (turn, removed) computed once
    again = counterfactual_scores(turns, surprisal, cache, pairs=[(3, 2)])
    assert again == {3: {2: pytest.approx(1.5)}} and len(calls) == n  # cached


def test_surprisal_fn_builds_the_turn_prompt_without_the_removed_turn() -> None:
    seen: list[tuple[GenerationRequest, list[str], str]] = []

    def scorer(req: GenerationRequest, texts: Sequence[str], prefix: str = "") -> list[float]:
        seen.append((req, list(texts), prefix))
        return [-6.0]

    f = surprisal_fn(SEED, MEMBERS, hand_turns(), scorer, tokenize=lambda s: [0] * len(s.split()))
    assert f(3, frozenset({2})) == pytest.approx(6.0 / 4)
    req, texts, prefix = seen[0]
    assert texts == ["Grey breath, night cold."] and prefix == "[Pulse]\n"
    assert "You are Pulse" in req.messages[0].content
    assert req.messages[-1].content == "[Echo]\nThe sky blue, you said: the sky blue."
    with pytest.raises(CouncilError, match="user's own"):
        f(0, frozenset())


class _CharTokenizer:
    """One token per character, with offsets (what a fast tokenizer reports)."""

    def apply_chat_template(self, msgs: list[dict[str, str]], **kw: object) -> str:
        return "".join(f"<{m['role']}>{m['content']}</>" for m in msgs) + "<assistant>"

    def __call__(self, text: str, **kw: object) -> dict[str, list[tuple[int, int]]]:
        return {"offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_attention_context_spans_locate_earlier_turns_in_the_prompt() -> None:
    b = ScriptedBackend(as_speaker())
    b.tokenizer = _CharTokenizer()  # type: ignore[attr-defined]
    c = Council(SEED, MEMBERS, b, "round-robin", attention=True)
    c.say("hello there")
    run_all(c, 2)
    assert b.requests[1].attention
    text = _CharTokenizer().apply_chat_template(
        [{"role": m.role, "content": m.content} for m in b.requests[1].messages]
    )
    spans = c.turns[2].context
    assert [s[0] for s in spans] == [0, 1]  # the user's words and Echo's turn
    for i, a, z in spans:
        assert text[a:z] == c.turns[i].text
    assert c.trace.turns[2]["context"] == spans  # recorded on the turn record
