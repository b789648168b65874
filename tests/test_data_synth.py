"""Synthetic voiced data: determinism, voices in character, variety, held-out topic split."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path
from statistics import mean

import pytest

from thoughtform.data import lexicon as L
from thoughtform.data.cli import cli_dataset
from thoughtform.data.formats import check_reply
from thoughtform.data.synth import (
    gerund,
    heldout_path,
    keywords,
    sentence_diversity,
    split_sentences,
    synth,
    to_second_person,
    topics,
    write_synth,
)
from thoughtform.data.validate import validate
from thoughtform.evaluate.adherence import (
    content_words,
    default_prompts_path,
    read_prompts,
    reply_text,
)
from thoughtform.parse import parse_text
from thoughtform.voices import PRESETS, VoiceSetError, voice_set_from_dict

SEED = PRESETS["seed"]
_STOP = set(
    "the and you your that this with about what have been from does keep for but not how why did "
    "get can its it's".split()
)


@pytest.fixture(scope="module")
def data2000() -> list[dict]:
    return list(synth("seed", n=2000, seed=0))


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 3 and w not in _STOP}


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_synth(a, n=300, seed=7, holdout=0.1)
    write_synth(b, n=300, seed=7, holdout=0.1)
    write_synth(c, n=300, seed=8, holdout=0.1)
    assert a.read_bytes() == b.read_bytes()
    assert heldout_path(a).read_bytes() == heldout_path(b).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert heldout_path(a).read_bytes() != heldout_path(c).read_bytes()


def test_every_reply_is_clean_and_multi_voice(data2000: list[dict]) -> None:
    declared = {v.name for v in SEED.voices}
    orders = set()
    pairs = set()
    for ex in data2000:
        user, reply = ex["messages"][0], ex["messages"][1]
        assert user["role"] == "user" and reply["role"] == "assistant"
        segs, problems = check_reply(reply["content"], SEED, strict=True, where="reply")
        assert problems == []
        voices = [s.voice for s in segs]
        assert set(voices) <= declared  # no unknown voice, no stray main text
        assert len(set(voices)) >= 2
        assert all(s.text for s in segs)
        orders.add(tuple(voices))
        pairs.update(pairwise(voices))
    # Varied orders, not a fixed script: every voice follows every other somewhere.
    assert len(orders) > 500
    assert pairs == {(a, b) for a in declared for b in declared if a != b}


def test_variety_of_sentences(data2000: list[dict]) -> None:
    d = sentence_diversity(data2000, SEED)
    assert d["sentences"] > 8000
    assert d["ratio"] > 0.92
    assert d["most_repeated"][0]["count"] <= 20
    prompts = [ex["messages"][0]["content"] for ex in data2000]
    assert len(set(prompts)) / len(prompts) > 0.9


def test_every_voice_speaks_of_the_prompt(data2000: list[dict]) -> None:
    # Each voice's text shares a content word (the eval's rule) with the prompt it answers.
    for ex in data2000:
        prompt = content_words(ex["messages"][0]["content"])
        for s in parse_text(ex["messages"][1]["content"], SEED):
            assert content_words(s.text) & prompt, (ex["messages"][0]["content"], s.text)


def test_no_word_in_a_large_share_of_replies(data2000: list[dict]) -> None:
    # The grammar's own words (not taken from the prompt) vary: a word repeated in most replies
    # whatever the question becomes a model's verbal tic ("voice" in 14 of 20 replies).
    counts: Counter[str] = Counter()
    for ex in data2000:
        prompt = content_words(ex["messages"][0]["content"])
        counts.update(content_words(reply_text(ex["messages"][1]["content"])) - prompt)
    word, n = counts.most_common(1)[0]
    assert n / len(data2000) < 0.15, word
    assert counts["voice"] == 0


def test_prompts_of_many_kinds(data2000: list[dict]) -> None:
    prompts = [ex["messages"][0]["content"] for ex in data2000]

    def share(kws: list[str]) -> float:
        pats = [re.compile(rf"\b{re.escape(k)}\b") for k in kws]
        return mean(any(p.search(x) for p in pats) for x in prompts)

    # Personal decisions, questions of fact, poems and stories, how-to tasks, manners,
    # definitions, comparisons and small talk all appear.
    assert 0.15 < share([k for _, k, _ in L.TOPICS]) < 0.4
    assert 0.2 < share([k for _, k, _, _ in L.SUBJECTS]) < 0.5
    for pool in (
        [k for _, _, k in L.TASKS],
        [k for _, _, k in L.MANNERS],
        list(L.WORDS),
        [k for _, k, _, _ in L.PAIRS],
        [k for _, k, _ in L.CHARACTERS],
        [k for _, k in L.CHATS],
    ):
        assert 0.02 < share(pool) < 0.15, pool[:3]
    verse = mean(bool(re.search(r"\b(poem|limerick|riddle|lullaby|ode)\b", p)) for p in prompts)
    assert 0.03 < verse < 0.2
    # The subjects are spread: no keyword is in more than 3% of the prompts.
    kws = keywords("train")
    per_kw = Counter(k for p in prompts for k in kws if re.search(rf"\b{re.escape(k)}\b", p))
    assert len(per_kw) > 250 and max(per_kw.values()) < 0.03 * len(prompts)


def test_voices_keep_their_manner(data2000: list[dict]) -> None:
    by_voice: dict[str, list[tuple[str, str]]] = {}
    for ex in data2000:
        prompt = ex["messages"][0]["content"]
        for s in parse_text(ex["messages"][1]["content"], SEED):
            by_voice.setdefault(s.voice, []).append((prompt, s.text))
    assert set(by_voice) == {v.name for v in SEED.voices}
    # Echo reflects the user's own words back.
    assert all(_words(p) & _words(t) for p, t in by_voice["Echo"])
    # Doubt asks.
    assert all("?" in t for _, t in by_voice["Doubt"])
    # Inner speaks in the first person.
    assert all(re.search(r"\b(I|me|my)\b", t) for _, t in by_voice["Inner"])

    def words_per_sentence(v: str) -> float:
        return mean(len(s.split()) for _, t in by_voice[v] for s in split_sentences(t))

    # Pulse is short: its sentences are much shorter than the talkative voices'.
    assert words_per_sentence("Pulse") < 0.6 * min(
        words_per_sentence(v) for v in ("Thread", "Role", "Shift", "Resonance")
    )


def test_heldout_topics_never_reach_training_prompts(tmp_path: Path) -> None:
    out = tmp_path / "syn.jsonl"
    res = write_synth(out, n=1000, seed=3, holdout=0.1)
    assert (res["train"], res["heldout"]) == (900, 100)
    assert heldout_path(out) == tmp_path / "syn.heldout.jsonl"
    train = [json.loads(x) for x in out.read_text().splitlines()]
    held = [json.loads(x) for x in heldout_path(out).read_text().splitlines()]
    assert (len(train), len(held)) == (900, 100)
    train_prompts = {ex["messages"][0]["content"] for ex in train}
    held_prompts = {ex["messages"][0]["content"] for ex in held}
    assert not train_prompts & held_prompts
    train_text = "\n".join(m["content"] for ex in train for m in ex["messages"])
    held_kw = keywords("heldout")
    assert len(held_kw) > 40 and set(keywords("train")).isdisjoint(held_kw)
    assert {k for _, k, _ in topics("heldout")} <= set(held_kw)
    for kw in held_kw:
        assert not re.search(rf"\b{re.escape(kw)}\b", train_text, re.I), kw
    # Every held-out prompt is about a held-out subject.
    assert all(
        any(re.search(rf"\b{re.escape(k)}\b", p, re.I) for k in held_kw) for p in held_prompts
    )


def _grammar_text() -> list[str]:
    options = [o for opts in L.RULES.values() for o in opts]
    for name in dir(L):
        if name.endswith(("_CORES", "_CLOSERS", "_OPENERS")):
            options += getattr(L, name)
    return [*options, *L.PERSONS, *L.FEELINGS, *L.TIMES]


def test_grammar_never_contains_topic_words() -> None:
    options = _grammar_text()
    for kw in keywords("train") + keywords("heldout"):
        pat = re.compile(rf"\b{re.escape(kw)}\b", re.I)
        assert not [o for o in options if pat.search(o)], kw


def test_every_slot_is_a_rule_or_context() -> None:
    # A misspelt slot would silently disable its sentence (a context slot is only optional).
    slots = {k for o in _grammar_text() for _, k in re.findall(r"\{(\^?)([a-z_0-9]+)\}", o)}
    prompt_only = {"phrase"}
    assert slots - set(L.RULES) - L.CONTEXT - prompt_only == set()
    assert L.CONTEXT.isdisjoint(L.RULES)


def test_eval_prompts_are_unseen_subjects() -> None:
    # The eval prompts test generalisation: no synth subject is a content word of them.
    eval_words = set().union(*(content_words(p) for p in read_prompts(default_prompts_path())))
    kws = keywords("train") + keywords("heldout")
    assert [k for k in kws if content_words(k) & eval_words] == []


def test_synth_output_validates_and_system_prompt(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    write_synth(out, n=50, seed=1, system=True)
    issues: list = []
    r = validate(out, "seed", strict=True, on_issue=issues.append)
    assert issues == [] and r.examples == 50
    first = json.loads(out.read_text().splitlines()[0])
    sys_msg = first["messages"][0]
    assert sys_msg["role"] == "system" and "[Echo]" in sys_msg["content"]


def test_other_voice_sets() -> None:
    custom = voice_set_from_dict(
        {"voices": ["Echo", {"name": "Muse"}, {"name": "think", "syntax": "tag"}]}
    )
    for ex in synth(custom, n=40, seed=0):
        segs, problems = check_reply(ex["messages"][-1]["content"], custom, True, "reply")
        assert problems == [] and len({s.voice for s in segs}) >= 2
    with pytest.raises(ValueError, match="at least 2 voices"):
        list(synth("think", n=1))


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn.jsonl"
    rc = cli_dataset(
        [
            "synth",
            "--voices",
            "seed",
            "--n",
            "200",
            "--seed",
            "0",
            "--out",
            str(out),
            "--holdout",
            "0.1",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"wrote 180 examples to {out} and 20 held-out examples to {heldout_path(out)}" in text
    assert re.search(r"distinct sentences: \d+\.\d% \(\d+ of \d+\); most repeated x\d+: ", text)
    assert cli_dataset(["synth", "--voices", "nosuch.yaml", "--out", str(out)]) == 2
    with pytest.raises(VoiceSetError):
        list(synth("nosuch.yaml", n=1))


def test_word_helpers() -> None:
    assert [gerund(v) for v in ("sell", "give away", "rewrite", "cancel", "tie", "see")] == [
        "selling",
        "giving away",
        "rewriting",
        "cancelling",
        "tying",
        "seeing",
    ]
    assert to_second_person("the bicycle I never ride with my friends") == (
        "the bicycle you never ride with your friends"
    )
    assert split_sentences('One. "Two?" (Three.) four') == ["One.", '"Two?"', "(Three.)", "four"]
