"""Synthetic voiced conversations: varied prompts, multi-voice replies, each voice in character.

Prompts come in many kinds (personal decisions, questions of fact, how-to tasks, poems and
stories, words to define, things to compare, manners, small talk) over a few hundred subjects.
Replies are built from a compositional grammar (:mod:`.lexicon`): sentence templates x slot
fillers x the prompt's own words (its subject, its verb, a quoted fragment), so every voice
speaks about what was asked, from its own angle, and a model trained on them learns each
voice's manner and to take up the prompt's words rather than a few memorised sentences.
Deterministic for a seed; the held-out split uses subjects (and so keywords) that never appear
in the training split.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

from ..parse import parse_text
from ..voices import Voice, VoiceSet, resolve_voice_set
from . import lexicon as L
from .convert import dumps_example
from .formats import render_voices

Split = Literal["train", "heldout"]
T = TypeVar("T")

_SLOT = re.compile(r"\{(\^?)([a-z_0-9]+)\}")
_PERSON = re.compile(r"\b(I'm|I've|I'd|I'll|I|me|my|mine|myself|we|us|our|ours)\b")
_YOU = {
    "I'm": "you're",
    "I've": "you've",
    "I'd": "you'd",
    "I'll": "you'll",
    "I": "you",
    "me": "you",
    "my": "your",
    "mine": "yours",
    "myself": "yourself",
    "we": "you",
    "us": "you",
    "our": "your",
    "ours": "yours",
}
# Words a quoted fragment should not start or end on: it would read as a broken-off phrase.
_STOP = frozenset(
    "the a an to of my and or in on at for with is it but about whether that this do be if "
    "what why how so can i i'm i've i'd me it's from through into by as than then again who "
    "which where when".split()
)
_PARTICLES = frozenset("away down up out over behind off back".split())
_DOUBLE = frozenset(
    "stop quit plan ship drop cut put run let get set sit swim begin forget admit dig skip chat "
    "scrap cancel submit split reset".split()
)
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|$)")


def gerund(verb_phrase: str) -> str:
    """``sell`` -> ``selling``, ``give away`` -> ``giving away`` (first word only)."""
    first, _, rest = verb_phrase.partition(" ")
    if first.endswith("ie"):
        g = first[:-2] + "ying"
    elif first in _DOUBLE:
        g = first + first[-1] + "ing"
    elif first.endswith("e") and not first.endswith(("ee", "ye", "oe")) and len(first) > 2:
        g = first[:-1] + "ing"
    else:
        g = first + "ing"
    return f"{g} {rest}" if rest else g


def with_object(verb_phrase: str, obj: str = "it") -> str:
    """``give away`` + it -> ``give it away``; ``ask for`` + it -> ``ask for it``."""
    head, _, last = verb_phrase.rpartition(" ")
    if head and last in _PARTICLES:
        return f"{head} {obj} {last}"
    return f"{verb_phrase} {obj}"


def to_second_person(text: str) -> str:
    """The user's words as the assistant would say them back (``my`` -> ``your``)."""
    return _PERSON.sub(lambda m: _YOU[m.group(0)], text)


def _cap(s: str) -> str:
    for i, ch in enumerate(s):
        if ch.isalpha():
            return s[:i] + ch.upper() + s[i + 1 :]
        if ch not in "\"'(":
            return s
    return s


def _in_split(i: int, split: Split) -> bool:
    return (i % L.HELDOUT_EVERY == L.HELDOUT_OFFSET) == (split == "heldout")


def _pool(entries: Sequence[T], split: Split) -> list[T]:
    """The entries of one split of a subject pool (the vocabulary split between the splits)."""
    return [e for i, e in enumerate(entries) if _in_split(i, split)]


def topics(split: Split) -> list[tuple[str, str, tuple[str, ...]]]:
    """The personal-decision topics of one split."""
    return _pool(L.TOPICS, split)


def keywords(split: Split) -> list[str]:
    """Every subject keyword of one split, over all kinds of prompt."""
    out = [k for _, k, _ in _pool(L.TOPICS, split)]
    out += [k for _, k, _, _ in _pool(L.SUBJECTS, split)]
    out += [k for _, _, k in _pool(L.TASKS, split)]
    out += [k for _, _, k in _pool(L.MANNERS, split)]
    out += _pool(L.WORDS, split)
    out += [k for _, a, _, b in _pool(L.PAIRS, split) for k in (a, b)]
    out += [k for _, k, _ in _pool(L.CHARACTERS, split)]
    out += [k for _, k in _pool(L.CHATS, split)]
    return out


class Grammar:
    """Expands ``{slot}`` templates from a context and the rule table, with a seeded RNG."""

    def __init__(self, rng: random.Random, rules: dict[str, tuple[str, ...]] = L.RULES) -> None:
        self.rng = rng
        self.rules = rules
        self.ctx: dict[str, str] = {}
        # Context slots each option needs: options needing absent ones are not picked, so a
        # reply only speaks of what its prompt said.
        self._needs = {
            o: frozenset(k for _, k in _SLOT.findall(o) if k not in rules)
            for opts in rules.values()
            for o in opts
        }

    def options(self, rule: str) -> list[str]:
        """The options of ``rule`` whose optional slots are all in the context."""
        return [o for o in self.rules[rule] if self._needs[o] <= self.ctx.keys()]

    def pick(self, rule: str) -> str:
        """One usable option of ``rule``."""
        return self.rng.choice(self.options(rule))

    def expand(self, template: str, depth: int = 0) -> str:
        """Fill every slot of ``template``."""
        if depth > 8:
            raise RecursionError("grammar rules nest too deeply")

        def fill(m: re.Match[str]) -> str:
            cap, key = m.group(1), m.group(2)
            val = self.ctx[key] if key in self.ctx else self.expand(self.pick(key), depth + 1)
            return _cap(val) if cap else val

        return _SLOT.sub(fill, template)


def _quote(rng: random.Random, text: str, topic: str) -> str:
    """A 3-6 word fragment of one sentence of the user's, on content words, touching the topic."""
    sentences = split_sentences(text)
    text = next((s for s in sentences if topic in s), text)
    raw = [w for w in text.split() if w.strip('.,?!:;"')]
    words = [w.strip('.,?!:;"') for w in raw]
    # A fragment never runs across a comma or colon ("kid: a lost astronaut" is two thoughts).
    breaks = [w.endswith((",", ":", ";")) for w in raw]
    key = {w.lower() for w in topic.split() if w.lower() not in _STOP and len(w) > 2}
    spans = [
        (i, j)
        for i in range(len(words))
        for j in range(i + 3, min(i + 6, len(words)) + 1)
        if words[i].lower() not in _STOP
        and words[j - 1].lower() not in _STOP
        and not any(breaks[i : j - 1])
        # End where a thought ends: on a topic word or at the end of the sentence.
        and (j == len(words) or words[j - 1].lower() in key)
    ]
    # Echo quotes what the message is about, not "Did I get".
    about = [(i, j) for i, j in spans if key & {w.lower() for w in words[i:j]}]
    if not (about or spans):
        return " ".join(words[-4:])
    i, j = rng.choice(about or spans)
    return " ".join(words[i:j])


@dataclass
class _Prompt:
    text: str
    ctx: dict[str, str]


def _plural(kw: str) -> bool:
    return kw.endswith("s") and not kw.endswith(("ss", "is", "us"))


def _number(plural: bool) -> dict[str, str]:
    """Agreement slots: ``{np} look{s3}``, ``{np} {be}``, ``{aux} {np} ...``; ``pl`` if plural."""
    if plural:
        return {"s3": "", "be": "are", "has": "have", "aux": "do", "pl": ""}
    return {"s3": "s", "be": "is", "has": "has", "aux": "does"}


def _verb_slots(verb: str) -> dict[str, str]:
    return {
        "verb": verb,
        "verb_ing": gerund(verb),
        "verb_it": with_object(verb),
        "verb_ing_it": with_object(gerund(verb)),
    }


def _kind(rng: random.Random, split: Split) -> tuple[str, tuple[str, ...], dict[str, str], str]:
    """One kind of prompt: (kind, its core templates, the prompt's words, the quoted topic).

    The words are the slots both the prompt and the reply may use, as the user says them.
    """
    kind = rng.choices([k for k, _ in L.KINDS], weights=[w for _, w in L.KINDS])[0]
    w: dict[str, str]
    if kind == "decide":
        phrase, kw, verbs = rng.choice(_pool(L.TOPICS, split))
        w = {"phrase": phrase, "np": phrase, "kw": kw, **_verb_slots(rng.choice(verbs))}
        w |= _number(_plural(kw))
        return kind, L.PROMPT_CORES, w, phrase
    if kind in ("fact_act", "fact", "make"):
        np_, kw, plural, acts = rng.choice(_pool(L.SUBJECTS, split))
        w = {"np": np_, "kw": kw, **_number(plural)}
        cores: tuple[str, ...]
        if kind == "fact_act":
            act = rng.choice(acts)
            w |= {"act": act, "act_ing": gerund(act)}
            cores = L.FACT_ACT_CORES
        else:
            cores = L.FACT_CORES if kind == "fact" else L.MAKE_CORES
        return kind, cores, w, np_
    if kind == "story":
        np_, kw, whos = rng.choice(_pool(L.CHARACTERS, split))
        return kind, L.STORY_CORES, {"np": np_, "kw": kw, "who": rng.choice(whos)}, np_
    if kind == "task":
        verb, np_, kw = rng.choice(_pool(L.TASKS, split))
        w = {"np": np_, "kw": kw, **_verb_slots(verb), **_number(_plural(kw))}
        return kind, L.TASK_CORES, w, np_
    if kind == "manners":
        act, np_, kw = rng.choice(_pool(L.MANNERS, split))
        w = {"act": act, "act_ing": gerund(act), "np": np_, "kw": kw, **_number(_plural(kw))}
        return kind, L.MANNERS_CORES, w, np_
    if kind == "word":
        word = rng.choice(_pool(L.WORDS, split))
        return kind, L.WORD_CORES, {"np": word, "kw": word, **_number(False)}, word
    if kind == "pair":
        a, ka, b, kb = rng.choice(_pool(L.PAIRS, split))
        w = {"np": a, "kw": ka, "np2": b, "kw2": kb, **_number(False)}
        return kind, L.PAIR_CORES, w, a
    np_, kw = rng.choice(_pool(L.CHATS, split))
    return "chat", L.CHAT_CORES, {"np": np_, "kw": kw, **_number(False)}, np_


def _question(kind: str, core: str, w: dict[str, str]) -> str | None:
    """The prompt's question restated in the reply's words (``why do owls hunt``), if any."""
    if kind == "task":
        return f"how to {w['verb']} {to_second_person(w['np'])}"
    if kind != "fact_act":
        return None
    wh = "how" if core.startswith("how") else "why"
    return f"{wh} {w['aux']} {w['np']} {w['act']}"


def _prompt(g: Grammar, split: Split) -> _Prompt:
    rng = g.rng
    kind, cores, words, topic = _kind(rng, split)
    user = {
        **words,
        "p_feeling": rng.choice(L.FEELINGS),
        "p_person": rng.choice(L.PERSONS),
        "p_time": rng.choice(L.TIMES),
    }
    core = rng.choice(cores)
    in_core = {k for _, k in _SLOT.findall(core)}
    closers = (
        ("",) if kind == "chat" else L.PROMPT_CLOSERS if kind == "decide" else L.QUESTION_CLOSERS
    )
    # A closer never repeats a slot the core already used ("I'm tired. ... I feel tired.").
    closer = rng.choice([c for c in closers if not {k for _, k in _SLOT.findall(c)} & in_core])
    used = in_core | {k for _, k in _SLOT.findall(closer)}
    g.ctx = user
    opener = "" if kind == "chat" else rng.choice(L.PROMPT_OPENERS)
    body = g.expand(core)
    # A new sentence after the opener ("Hi. Should I...") starts upper case; "So, should I" not.
    if not opener or opener.endswith((". ", "? ")):
        body = _cap(body)
    text = _cap(opener + body + g.expand(closer))
    # The reply's context: what the prompt said (in the second person), and nothing else.
    ctx = {k: to_second_person(v) for k, v in words.items() if k != "phrase"}
    # A verb the prompt did not say is not the reply's to use.
    if not used & {"verb", "verb_ing"}:
        for k in ("verb", "verb_ing", "verb_it", "verb_ing_it"):
            ctx.pop(k, None)
    if not used & {"act", "act_ing"}:
        for k in ("act", "act_ing"):
            ctx.pop(k, None)
    ctx["quote"] = _quote(rng, body, topic)
    ctx[f"k_{'fact' if kind.startswith('fact') else kind}"] = ""
    question = _question(kind, core, words)
    if question and (used & {"act", "verb"}):
        ctx["question"] = question
    # One person and feeling per conversation, so the voices agree with each other.
    ctx["person"] = user["p_person"]
    ctx["feeling"] = user["p_feeling"]
    for k in ("p_feeling", "p_person", "p_time"):
        if k in used:
            ctx[k] = user[k]
    return _Prompt(text, ctx)


def _manner(v: Voice) -> tuple[str, tuple[int, ...]]:
    return L.VOICE_RULES.get(v.name.casefold(), L.GENERIC_RULE)


def _voice_text(g: Grammar, v: Voice) -> str:
    rule, lengths = _manner(v)
    opts = g.options(rule)
    k = min(g.rng.choice(lengths), len(opts))
    # Different sentence shapes within one voice: "Privately, ... Privately, ..." reads as a loop.
    return " ".join(_cap(g.expand(t)) for t in g.rng.sample(opts, k))


def _order(rng: random.Random, voices: list[Voice]) -> list[Voice]:
    """2-5 distinct voices in a varied order, sometimes with one coming back at the end."""
    k = rng.choices((2, 3, 4, 5), weights=(35, 35, 20, 10))[0]
    chosen = rng.sample(voices, min(k, len(voices)))
    names = [v.name.casefold() for v in chosen]
    # Mild habits, not rules: Echo likes to open, Thread likes to close.
    if "echo" in names and rng.random() < 0.5:
        chosen.insert(0, chosen.pop(names.index("echo")))
    names = [v.name.casefold() for v in chosen]
    if "thread" in names and rng.random() < 0.4:
        chosen.append(chosen.pop(names.index("thread")))
    if len(chosen) >= 3 and rng.random() < 0.12:
        chosen.append(chosen[0])
    return chosen


def system_prompt(vs: VoiceSet) -> str:
    """A system message that tells a model which voices it speaks in and how to mark them."""
    lines = ["You answer in inner voices. Start each voice on its own line with its marker."]
    for v in sorted(vs.voices, key=lambda v: v.lane):
        desc = v.description or f"{v.name} speaks."
        lines.append(f"{v.open_marker} {desc}")
    return "\n".join(lines)


def synth(
    voices: VoiceSet | str | None = "seed",
    n: int = 2000,
    seed: int = 0,
    split: Split = "train",
    system: bool = False,
) -> Iterator[dict[str, Any]]:
    """``n`` synthetic examples ``{"messages": [...]}`` in voices; the same seed gives the same data."""
    vs = resolve_voice_set(voices)
    pool = list(vs.voices)
    if len(pool) < 2:
        raise ValueError(
            f"synth needs a voice set with at least 2 voices ({vs.name!r} has {len(pool)})"
        )
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = ",".join(v.name for v in pool)
    rng = random.Random(f"thoughtform-synth:{seed}:{split}:{names}")
    g = Grammar(rng)
    sys_text = system_prompt(vs) if system else None
    for _ in range(n):
        p = _prompt(g, split)
        g.ctx = p.ctx
        parts = [(v.name, _voice_text(g, v)) for v in _order(rng, pool)]
        msgs = [{"role": "system", "content": sys_text}] if sys_text else []
        msgs.append({"role": "user", "content": p.text})
        msgs.append({"role": "assistant", "content": render_voices(parts, vs)})
        yield {"messages": msgs}


def heldout_path(out: str | Path) -> Path:
    """``data.jsonl`` -> ``data.heldout.jsonl``."""
    p = Path(out)
    return p.with_name((p.stem if p.suffix else p.name) + ".heldout.jsonl")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (ends at . ! ? or a line break), stripped."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def sentence_diversity(
    examples: Iterable[dict[str, Any]], voices: VoiceSet | str | None = "seed", top: int = 5
) -> dict[str, Any]:
    """How varied the replies are: distinct sentences / all sentences, and the most repeated."""
    vs = resolve_voice_set(voices)
    counts: Counter[str] = Counter()
    for ex in examples:
        for m in ex["messages"]:
            if m["role"] != "assistant":
                continue
            for seg in parse_text(m["content"], vs):
                counts.update(split_sentences(seg.text))
    total = sum(counts.values())
    return {
        "sentences": total,
        "distinct": len(counts),
        "ratio": (len(counts) / total) if total else 0.0,
        "most_repeated": [{"sentence": s, "count": c} for s, c in counts.most_common(top)],
    }


def write_synth(
    out: str | Path,
    voices: VoiceSet | str | None = "seed",
    n: int = 2000,
    seed: int = 0,
    holdout: float = 0.0,
    system: bool = False,
) -> dict[str, Any]:
    """Write ``n`` examples: ``round(n * holdout)`` to the held-out file, the rest to ``out``."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n_held = round(n * holdout)
    n_train = n - n_held
    out = Path(out)

    def written(f: TextIO) -> Iterator[dict[str, Any]]:
        for ex in synth(voices, n_train, seed, "train", system):
            f.write(dumps_example(ex) + "\n")
            yield ex

    with out.open("w", encoding="utf-8", newline="\n") as f:
        diversity = sentence_diversity(written(f), voices)
    result: dict[str, Any] = {"out": str(out), "train": n_train, "diversity": diversity}
    if n_held:
        hp = heldout_path(out)
        with hp.open("w", encoding="utf-8", newline="\n") as f:
            for ex in synth(voices, n_held, seed, "heldout", system):
                f.write(dumps_example(ex) + "\n")
        result["heldout"] = n_held
        result["heldout_out"] = str(hp)
    return result
