"""Resonance arcs and the measure a council can give (resonance.arcs, resonance.council_scores)
on hand-built scores and scripted councils: thresholds, order, per-member backends, the
counterfactual cache, and the one-line reason when a backend cannot give a measure."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from council_scripted import ScriptedBackend, as_speaker, speaker_of

from thoughtform.backends.base import GenerationRequest
from thoughtform.council import Council
from thoughtform.resonance import (
    Arc,
    MeasureUnavailable,
    arcs,
    council_scores,
    echo_scores,
)
from thoughtform.voices import PRESETS

SEED = PRESETS["seed"]
MEMBERS = ["Echo", "Doubt", "Pulse"]


class TextOnly(ScriptedBackend):
    """A backend that can only generate (like replay or an OpenAI server)."""

    score_continuations = None  # type: ignore[assignment]


def test_arcs_keep_earlier_turns_above_the_threshold_strongest_first() -> None:
    scores = {
        3: {0: 0.01, 1: 0.3, 2: 0.6},
        2: {0: 0.05, 1: float("nan")},
        1: {0: -0.4},  # a counterfactual turn made less expected: no arc
        4: {5: 0.9, 3: float("inf")},  # not earlier / not finite
    }
    got = arcs(scores)
    assert got == [Arc(2, 0, 0.05), Arc(3, 2, 0.6), Arc(3, 1, 0.3)]
    assert arcs(scores, threshold=0.5) == [Arc(3, 2, 0.6)]
    assert got[1].to_dict() == {"to": 3, "from": 2, "w": 0.6}


def test_arcs_from_echo_on_a_hand_built_council() -> None:
    c = Council(SEED, MEMBERS, TextOnly(as_speaker("x")), "list")
    c.say("Why is the sky blue?")
    c.say("The sky blue, you said: the sky blue.", "Echo")
    c.say("Is the sky blue at night, or only grey?", "Doubt")
    c.say("Grey breath, night cold.", "Pulse")
    s = council_scores(c, "echo")
    assert s == echo_scores(c.turns)
    # Pulse takes grey and night from Doubt (2 of its 6 units); nothing from Echo.
    assert arcs(s) == [
        Arc(1, 0, pytest.approx(3 / 4)),  # type: ignore[arg-type]
        Arc(2, 0, pytest.approx(3 / 5)),  # type: ignore[arg-type]
        Arc(3, 2, pytest.approx(1 / 3)),  # type: ignore[arg-type]
    ]


def test_measures_a_text_only_backend_cannot_give_say_so_in_one_line() -> None:
    c = Council(SEED, MEMBERS, TextOnly(as_speaker()), "list")
    c.say("hello")
    list(c.run(2))
    with pytest.raises(MeasureUnavailable, match=r"^attention: needs the transformers backend"):
        council_scores(c, "attention")
    with pytest.raises(MeasureUnavailable, match=r"^counterfactual: backend scripted cannot"):
        council_scores(c, "counterfactual")
    with pytest.raises(MeasureUnavailable, match="unknown measure 'vibes'"):
        council_scores(c, "vibes")
    for measure in ("attention", "counterfactual"):
        with pytest.raises(MeasureUnavailable) as e:
            council_scores(c, measure)
        assert "\n" not in str(e.value)


def _scorer(log: list[str]) -> object:
    """Log-probabilities that reward a turn whose context holds the word it repeats."""

    def scores(req: GenerationRequest, texts: Sequence[str], prefix: str) -> list[float]:
        ctx = " ".join(m.content for m in req.messages)
        log.append(prefix)
        return [-(1.0 if "sea" in ctx else 3.0) * len(t.split()) for t in texts]

    return scores


def test_counterfactual_scores_finished_model_turns_through_their_speakers_backend() -> None:
    log_a: list[str] = []
    log_b: list[str] = []
    reply = as_speaker("the sea again")
    shared = ScriptedBackend(reply, scores=_scorer(log_a))  # type: ignore[arg-type]
    pulse = ScriptedBackend(reply, scores=_scorer(log_b), name="other")  # type: ignore[arg-type]
    c = Council(SEED, MEMBERS, shared, "list", backends={"Pulse": pulse})
    c.say("Is the sea here?")
    list(c.run(3))
    c.say("written by me", "Doubt")  # the user's text: not scored
    cache: dict[tuple[int, frozenset[int]], float] = {}
    s = council_scores(c, "counterfactual", cache)
    assert sorted(s) == [1, 2, 3]  # model turns only; the user's words (0 and 4) are not
    # Without turn 0 (the only one saying "sea" for turn 1) turn 1 is 2 nats/word more surprising.
    assert s[1] == {0: pytest.approx(2.0)}
    # Later turns still see "sea" in other earlier turns: removing any one changes nothing.
    assert all(v == pytest.approx(0.0) for v in s[3].values())
    assert set(s[3]) == {0, 1, 2}
    # Pulse's turn (3) went through its own backend, the others through the shared one.
    assert log_b and set(log_b) == {"[Pulse]\n"}
    assert "[Pulse]\n" not in log_a and log_a
    n = len(log_a) + len(log_b)
    assert n == len(cache)  # each (turn, removed) scored once
    again = council_scores(c, "counterfactual", cache)
    assert again == s and len(log_a) + len(log_b) == n  # all from the cache
    assert all(math.isfinite(v) for row in s.values() for v in row.values())


def test_counterfactual_without_compute_uses_the_cache_only() -> None:
    log: list[str] = []
    b = ScriptedBackend(as_speaker("the sea"), scores=_scorer(log))  # type: ignore[arg-type]
    c = Council(SEED, MEMBERS, b, "list")
    c.say("sea?")
    list(c.run(1))
    cache: dict[tuple[int, frozenset[int]], float] = {}
    assert council_scores(c, "counterfactual", cache, compute=False) == {}
    assert log == []
    first = council_scores(c, "counterfactual", cache)
    list(c.run(1))
    later = council_scores(c, "counterfactual", cache, compute=False)
    assert later == first  # turn 2 is not scored until computing is allowed
    assert sorted(council_scores(c, "counterfactual", cache)) == [1, 2]


def test_speaker_of_the_scripted_turns() -> None:
    # The scripted backend answers as the member its persona names (what the tests rely on).
    b = TextOnly(as_speaker())
    c = Council(SEED, MEMBERS, b, "list")
    c.say("hi")
    list(c.run(3))
    assert [speaker_of(r) for r in b.requests] == MEMBERS
    assert [t.voice for t in c.turns[1:]] == MEMBERS
