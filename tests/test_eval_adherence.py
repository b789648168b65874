"""Adherence metrics on hand-made replies: exact form rates, copy rates, distinct-2, accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from thoughtform.evaluate import adherence as A
from thoughtform.evaluate.cli import cli_eval
from thoughtform.voices import voice_set_from_dict

GOOD_1 = "[Echo]\nYou want to cook tonight. Cook, you said.\n\n[Doubt]\nWhat is missing here?"
ONE_VOICE = "[Echo]\nOnly one voice here."
OUTSIDE = "Hello there.\n[Echo]\nA.\n[Doubt]\nB?"
UNKNOWN = "[Echo]\nx\n[Nonsense]\ny\n[Doubt]\nz"
GOOD_2 = "[Pulse]\nOne breath.\n\n[Shift]\nTurn it around: look from the other side."
SAME_TWICE = "[Echo]\nOne.\n\n[Echo]\nTwo."
CLOSED_THEN_OUTSIDE = "[Echo]\nA\n[/Echo]\nafter\n[Doubt]\nB"
EMPTY_VOICE = "[Echo]\n\n[Doubt]\nOnly Doubt has words."


def test_form_rate_exact() -> None:
    replies = [GOOD_1, ONE_VOICE, OUTSIDE, UNKNOWN, GOOD_2]
    assert A.form_rate(replies, "seed") == pytest.approx(2 / 5)
    assert [A.form_check(r, "seed").ok for r in replies] == [True, False, False, False, True]
    assert A.form_rate([], "seed") == 0.0


def test_form_check_reasons() -> None:
    assert A.form_check(OUTSIDE, "seed").outside == "Hello there."
    assert A.form_check(UNKNOWN, "seed").unknown == ("Nonsense",)
    # One voice twice is not two voices; a voice with no words does not count.
    assert not A.form_check(SAME_TWICE, "seed").ok
    assert A.form_check(EMPTY_VOICE, "seed").voices == ("Doubt",)
    assert not A.form_check(EMPTY_VOICE, "seed").ok
    # Text after an explicit close marker is outside any voice.
    assert A.form_check(CLOSED_THEN_OUTSIDE, "seed").outside == "after"
    # Voice names match case-insensitively and are reported canonically.
    assert A.form_check("[echo]\na\n[DOUBT]\nb", "seed").voices == ("Echo", "Doubt")


def test_form_unclosed_tag_and_strict_sets() -> None:
    vs = voice_set_from_dict(
        {
            "name": "t",
            "unknown": "strict",
            "voices": ["Echo", "Doubt", {"name": "think", "syntax": "tag"}],
        }
    )
    unclosed = A.form_check("<think>hmm\n[Echo]\nhi\n[Doubt]\nno?", vs)
    assert unclosed.unclosed == ("think",) and not unclosed.ok
    assert A.form_check("<think>hmm</think>\n[Echo]\nhi\n[Doubt]\nno?", vs).ok
    # A strict set would swallow an unknown marker as text; the check still sees it.
    assert A.form_check(UNKNOWN, vs).unknown == ("Nonsense",)


def test_copied_sentence_rate_exact() -> None:
    training = "[Echo]\nKeep what still works and mend what doesn't. Short one.\n"
    replies = [
        "[Thread]\nKeep what still works and mend what doesn't. This is a new sentence here.",
        # Four words, a case-insensitive verbatim piece of a training sentence: copied.
        "[Doubt]\nkeep   WHAT still works\n\n[Echo]\nShort one.",
    ]
    # Counted: 8-word copy, new 6-word sentence, 4-word copy; "Short one." is under 4 words.
    assert A.copied_sentence_rate(replies, training, "seed") == pytest.approx(2 / 3)
    assert A.copied_sentence_rate(["[Echo]\nYes."], training, "seed") == 0.0
    # Markers are not sentence text: a reply of only a copied marker line copies nothing.
    assert A.copied_sentence_rate(["[Echo]\nAll of this is brand new text."], training) == 0.0


def test_distinct2_exact() -> None:
    replies = ["[Echo]\nA b a b.", "[Doubt]\nA b c?"]
    # Bigrams per reply: (a,b) (b,a) (a,b) | (a,b) (b,c) -> 3 distinct of 5; markers excluded.
    assert A.distinct_n(replies, 2, "seed") == pytest.approx(3 / 5)
    assert A.distinct_n(["[Echo]\nword"], 2, "seed") == 0.0
    assert A.distinct_n(["[Echo]\nOne two three four."], 2, "seed") == 1.0


def _training() -> list[list[dict[str, str]]]:
    echo = ["you said {w}, {w}", "{w}, you say, and the word comes back", "so: {w}. {w} again"]
    doubt = ["but is {w} really true?", "who told you {w}?", "what is missing from {w}?"]
    words = ["rain", "bread", "the train", "a letter", "music", "the garden", "winter", "coffee"]
    out = []
    for i, w in enumerate(words):
        reply = f"[Echo]\n{echo[i % 3].format(w=w)}\n\n[Doubt]\n{doubt[i % 3].format(w=w)}"
        out.append([{"role": "user", "content": w}, {"role": "assistant", "content": reply}])
    return out


def test_voice_accuracy_follows_markers() -> None:
    training = _training()
    segs = A.training_segments(training, "seed")
    assert len(segs) == 16 and {v for v, _ in segs} == {"Echo", "Doubt"}
    clf = A.VoiceClassifier().fit(segs)
    right = ["[Echo]\nthe sea, you said, the sea\n\n[Doubt]\nbut is the sea really true?"]
    swapped = ["[Doubt]\nthe sea, you said, the sea\n\n[Echo]\nbut is the sea really true?"]
    assert A.voice_accuracy(clf, right, "seed") == 1.0
    assert A.voice_accuracy(clf, swapped, "seed") == 0.0
    assert A.voice_accuracy(clf, ["no voices at all"], "seed") is None


SUMMARY_KEYS = [
    "n",
    "base",
    "tuned",
    "voice_accuracy",
    "copied_sentence_rate",
    "distinct2",
    "relevance",
    "relevance_shuffled",
    "tic_rate",
    "tic_word",
    "base_relevance",
    "base_relevance_shuffled",
    "base_tic_rate",
    "base_tic_word",
]


def test_score_summary_keys() -> None:
    training = _training()
    prompts = ["What should I cook tonight?", "Which way is north?"]
    res = A.score(prompts, [ONE_VOICE, OUTSIDE], [GOOD_1, GOOD_2], training, "seed")
    s = res.summary()
    assert list(s) == SUMMARY_KEYS
    assert s["n"] == 2 and s["base"] == 0.0 and s["tuned"] == 1.0
    assert s["copied_sentence_rate"] == 0.0
    # GOOD_1 answers "cook tonight" (cook); GOOD_2 shares nothing with "Which way is north?".
    assert s["relevance"] == 0.5
    # Crossed: GOOD_1 vs the north prompt, GOOD_2 vs the cooking prompt: neither shares a word.
    assert s["relevance_shuffled"] == 0.0
    assert s["base_relevance"] == 0.0
    with pytest.raises(ValueError, match="1 prompts, 2 base and 2 tuned"):
        A.score(prompts[:1], [ONE_VOICE, OUTSIDE], [GOOD_1, GOOD_2], training, "seed")


def test_stem_and_content_words() -> None:
    stems = {w: A.stem(w) for w in ("bees", "flies", "storing", "stored", "store", "running")}
    assert stems == {
        "bees": "bee",
        "flies": "fly",
        "storing": "stor",
        "stored": "stor",
        "store": "stor",
        "running": "run",
    }
    assert [A.stem(w) for w in ("glasses", "boxes", "octopuses", "Juliet's", "bus")] == [
        "glass",
        "box",
        "octopus",
        "juliet",
        "bus",
    ]
    # Stop words, contractions (either apostrophe), short words and digits are not content.
    assert A.content_words("Why do bees make honey? It’s the bees' job, isn't it? 42 ox") == {
        "bee",
        "mak",
        "honey",
        "job",
    }
    assert A.content_words("I'm sure you're not, are you?") == {"sur"}
    assert A.content_words("") == set()


PROMPTS3 = ["How do bees make honey?", "Describe a city at night.", "Why is the sea salty?"]
# Voice markers are not words of the reply: [Echo] does not make a reply about echoes.
REPLIES3 = [
    "[Echo]\nBees, bees: honey again.\n\n[Doubt]\nReally?",
    "[Pulse]\nChest tight.\n\n[Shift]\nLook at the lights from the other side.",
    "[Thread]\nThe city at night, and the salt of it.\n\n[Role]\nAs a sailor: salt.",
]


def test_relevance_exact() -> None:
    # Reply 0 shares bee/honey with its prompt, 1 nothing, 2 nothing ("salt" is not "salty").
    assert A.relevance(PROMPTS3, REPLIES3, "seed") == pytest.approx(1 / 3)
    # Mismatched pairs (6): only reply 2 against prompt 1 (city, night) shares a word.
    assert A.relevance_shuffled(PROMPTS3, REPLIES3, "seed") == pytest.approx(1 / 6)
    assert A.relevance([], [], "seed") == 0.0
    assert A.relevance_shuffled(PROMPTS3[:1], REPLIES3[:1], "seed") == 0.0
    with pytest.raises(ValueError, match="3 prompts but 2 replies"):
        A.relevance(PROMPTS3, REPLIES3[:2], "seed")
    # The marker name alone is not a shared word.
    assert A.relevance(["Tell me about echo chambers."], ["[Echo]\nYes.\n[Doubt]\nNo?"]) == 0.0


def test_tic_exact() -> None:
    replies = [
        "[Echo]\nBees, bees: a question.\n\n[Doubt]\nA question?",
        "[Pulse]\nA question, chest tight.",
        "[Thread]\nThe city at night. Salt, and a chest.",
    ]
    # "question" (2 of 3) and "chest" (2 of 3) are in no prompt; ties go alphabetically.
    assert A.tic(PROMPTS3, replies, "seed") == (pytest.approx(2 / 3), "chest")
    # Words of any prompt are not tics: "city" and "night" come from prompt 1, "bee" from 0.
    assert A.tic(PROMPTS3, ["[Echo]\nCity night bees.", "[Echo]\nBees."], "seed") == (0.0, None)
    assert A.tic(PROMPTS3, [], "seed") == (0.0, None)


def test_shipped_prompts() -> None:
    prompts = A.read_prompts(A.default_prompts_path())
    assert 35 <= len(prompts) <= 60
    assert len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)


def test_read_prompts_skips_blanks_and_comments(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text("# c\n\n  first  \nsecond\n", encoding="utf-8")
    assert A.read_prompts(p) == ["first", "second"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["adherence", "--prompts", "/nonexistent/p.txt"], "no such file"),
        (["adherence", "--limit", "0"], "--limit"),
        (["adherence", "--adapter", "/nonexistent.gguf"], "no such adapter"),
        (["adherence", "--dataset", "/nonexistent.jsonl"], "no such file"),
        (["adherence", "--bogus"], "unrecognized"),
        ([], "required"),
    ],
)
def test_cli_user_mistakes(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        rc = cli_eval(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_empty_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p.txt"
    p.write_text("# only a comment\n", encoding="utf-8")
    assert cli_eval(["adherence", "--prompts", str(p)]) == 2
    assert "no prompts" in capsys.readouterr().err
