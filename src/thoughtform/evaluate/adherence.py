"""Does a model speak in voices? Form (well-formed replies), character (does each voice sound like
itself), originality (copied sentences, distinct-2) -- measured on replies generated through
llama.cpp, the path users run.

Definitions (exact, so tests can pin them):

* **form**: a reply is well-formed when it has >= 2 distinct declared voices with text, no
  unknown voice, no unclosed tag marker, and no non-whitespace text outside voices.
* **character**: char n-gram TF-IDF + logistic regression fitted on the training set's voice
  segments predicts the voice of each generated segment (declared voices only); accuracy.
* **copied sentence rate**: of the generated sentences with >= ``MIN_COPY_WORDS`` words, the
  fraction that occur verbatim (case-insensitively, whitespace collapsed) in the training replies.
* **distinct-2**: distinct word bigrams / all word bigrams, bigrams taken within each reply's
  voice text (markers excluded).
* **content words** (:func:`content_words`): the words of a text (letters, inner apostrophes),
  lowercased, minus :data:`STOP_WORDS` (closed-class words -- articles, pronouns, prepositions,
  conjunctions, auxiliaries and modals, their contractions -- plus the commonest adverbs and
  interjections) and words under 3 letters, each reduced by :func:`stem` (possessive and plural
  endings, -ing, -ed, a final e, a doubled final consonant), so "storing", "stored" and "store"
  are one word.
* **relevance**: the fraction of replies whose voice text shares a content word with their own
  prompt. **relevance_shuffled** is the same for mismatched pairs (every reply against every
  other prompt, which is the mean over all shuffled pairings): the level a reply reaches by
  chance, with no regard for its prompt.
* **tic rate**: over the content words of the replies that occur in no prompt, the largest
  fraction of replies containing one of them (the word is reported too): a model with a verbal
  tic puts the same word into most replies, whatever it was asked.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..parse import Segment, parse_text
from ..voices import VoiceSet, resolve_voice_set

MIN_COPY_WORDS = 4
MAX_NEW_TOKENS = 160
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|$)")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_SPACE = re.compile(r"\s+")
_LETTERS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_VOWEL = re.compile(r"[aeiouy]")

# Closed-class English words (and the commonest adverbs and interjections): never content.
STOP_WORDS = frozenset(
    """
    a an the this that these those some any each every all both either neither no none other
    another such own same i me my mine myself we us our ours ourselves you your yours yourself
    yourselves he him his himself she her hers herself it its itself they them their theirs
    themselves one ones someone something somebody anyone anything anybody everyone everything
    everybody nobody nothing what which who whom whose when where why how whether whatever
    whoever of in on at to for with from by about into onto through over under above below
    between among against during before after since until till without within along across
    behind beyond near off out up down around toward towards upon via per like and or but nor
    so yet if then than because while although though unless as is am are was were be been
    being have has had having do does did doing done will would shall should can could may
    might must ought i'm i've i'd i'll you're you've you'd you'll he's she's it's we're we've
    we'd we'll they're they've they'd they'll that's there's here's what's who's let's don't
    doesn't didn't isn't aren't wasn't weren't won't wouldn't can't cannot couldn't shouldn't
    haven't hasn't hadn't not yes very too also just only even still again ever never always
    often here there now more most much many less least few well perhaps maybe quite rather
    almost already really oh ah hm hmm okay ok
    """.split()
)


@dataclass(frozen=True)
class FormCheck:
    """Why a reply is or is not well-formed."""

    voices: tuple[str, ...]
    unknown: tuple[str, ...]
    unclosed: tuple[str, ...]
    outside: str

    @property
    def ok(self) -> bool:
        """>= 2 distinct declared voices, no unknown voice, nothing unclosed, nothing outside."""
        return (
            len(set(self.voices)) >= 2
            and not self.unknown
            and not self.unclosed
            and not self.outside
        )


def _lenient(vs: VoiceSet) -> VoiceSet:
    # Unknown but well-formed names must show up as voices, or they could not be counted.
    return vs if vs.unknown == "lenient" else replace(vs, unknown="lenient")


def voice_segments(reply: str, voices: VoiceSet | str | None = "seed") -> list[Segment]:
    """The reply's segments with text, parsed leniently (unknown names become voices)."""
    vs = _lenient(resolve_voice_set(voices))
    return [s for s in parse_text(reply, vs) if s.text.strip()]


def form_check(reply: str, voices: VoiceSet | str | None = "seed") -> FormCheck:
    """Check one reply's form (see the module docstring)."""
    vs = resolve_voice_set(voices)
    declared: list[str] = []
    unknown: list[str] = []
    unclosed: list[str] = []
    outside: list[str] = []
    for s in voice_segments(reply, vs):
        v = vs.get(s.voice)
        if s.voice == vs.default_voice and v is None:
            outside.append(s.text.strip())
        elif v is None:
            unknown.append(s.voice)
        else:
            declared.append(v.name)
            if v.syntax == "tag" and s.marker and not s.close_marker:
                unclosed.append(v.name)
    return FormCheck(tuple(declared), tuple(unknown), tuple(unclosed), " ".join(outside))


def form_rate(replies: Sequence[str], voices: VoiceSet | str | None = "seed") -> float:
    """Fraction of well-formed replies (0.0 for none)."""
    if not replies:
        return 0.0
    return sum(form_check(r, voices).ok for r in replies) / len(replies)


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (each ends at . ! ? or a line break), stripped."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def reply_sentences(replies: Iterable[str], voices: VoiceSet | str | None = "seed") -> list[str]:
    """Every sentence of the voice text of the replies (markers excluded)."""
    out: list[str] = []
    for r in replies:
        for s in voice_segments(r, voices):
            out += split_sentences(s.text)
    return out


def copied_sentence_rate(
    replies: Sequence[str],
    training_text: str,
    voices: VoiceSet | str | None = "seed",
    min_words: int = MIN_COPY_WORDS,
) -> float:
    """Fraction of generated sentences of >= ``min_words`` words found verbatim in the training
    text (case-insensitive, whitespace collapsed); 0.0 when no sentence is long enough."""
    corpus = _norm(training_text)
    counted = [s for s in reply_sentences(replies, voices) if len(_WORD.findall(s)) >= min_words]
    if not counted:
        return 0.0
    return sum(_norm(s) in corpus for s in counted) / len(counted)


def distinct_n(replies: Sequence[str], n: int = 2, voices: VoiceSet | str | None = "seed") -> float:
    """Distinct word n-grams / all word n-grams over the replies' voice text (0.0 for none)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for r in replies:
        words = [w.casefold() for s in voice_segments(r, voices) for w in _WORD.findall(s.text)]
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


# ---------------------------------------------------------------------------- relevance


def stem(word: str) -> str:
    """A crude suffix stripper, the same for prompt and reply: ``bees`` -> ``bee``, ``flies``
    -> ``fly``, ``storing``/``stored``/``store`` -> ``stor``, ``running`` -> ``run``."""
    w = word.casefold().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.rstrip("'")

    def base(s: str) -> bool:  # what is left is still a word: 3+ letters with a vowel
        return len(s) >= 3 and bool(_VOWEL.search(s))

    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ing") and base(w[:-3]):
        w = w[:-3]
    elif w.endswith("ed") and not w.endswith("eed") and base(w[:-2]):
        w = w[:-2]
    elif w.endswith(("ches", "shes", "xes", "zes")) and len(w) > 4:
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeiouylsz":
        w = w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """The stemmed content words of ``text`` (see the module docstring for the rule)."""
    out: set[str] = set()
    for m in _LETTERS.finditer(text.replace("’", "'")):
        w = m.group(0).casefold()
        if w in STOP_WORDS or len(w) < 3:
            continue
        out.add(stem(w))
    return out


def reply_text(reply: str, voices: VoiceSet | str | None = "seed") -> str:
    """The words of a reply without its voice markers."""
    return "\n".join(s.text for s in voice_segments(reply, voices))


def _reply_words(replies: Sequence[str], voices: VoiceSet | str | None) -> list[set[str]]:
    return [content_words(reply_text(r, voices)) for r in replies]


def relevance(
    prompts: Sequence[str], replies: Sequence[str], voices: VoiceSet | str | None = "seed"
) -> float:
    """Fraction of replies sharing a content word with their own prompt (0.0 for none)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    if not replies:
        return 0.0
    pw = [content_words(p) for p in prompts]
    rw = _reply_words(replies, voices)
    return sum(bool(p & r) for p, r in zip(pw, rw, strict=True)) / len(replies)


def relevance_shuffled(
    prompts: Sequence[str], replies: Sequence[str], voices: VoiceSet | str | None = "seed"
) -> float:
    """Relevance of mismatched pairs: every reply against every other prompt (0.0 under 2)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    n = len(replies)
    if n < 2:
        return 0.0
    pw = [content_words(p) for p in prompts]
    rw = _reply_words(replies, voices)
    hits = sum(bool(pw[j] & rw[i]) for i in range(n) for j in range(n) if i != j)
    return hits / (n * (n - 1))


def tic(
    prompts: Sequence[str], replies: Sequence[str], voices: VoiceSet | str | None = "seed"
) -> tuple[float, str | None]:
    """The largest fraction of replies containing one content word found in no prompt, and that
    word (``(0.0, None)`` when there is none; ties go to the alphabetically first)."""
    if not replies:
        return 0.0, None
    in_prompts = set().union(*(content_words(p) for p in prompts))
    counts: Counter[str] = Counter()
    for words in _reply_words(replies, voices):
        counts.update(words - in_prompts)
    if not counts:
        return 0.0, None
    word, c = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return c / len(replies), word


# ---------------------------------------------------------------------------- character


def training_segments(
    examples: Iterable[Sequence[dict[str, str]]], voices: VoiceSet | str | None = "seed"
) -> list[tuple[str, str]]:
    """(voice, text) of every declared-voice segment of the assistant replies."""
    vs = resolve_voice_set(voices)
    out: list[tuple[str, str]] = []
    for messages in examples:
        for m in messages:
            if m.get("role") != "assistant":
                continue
            for s in voice_segments(m["content"], vs):
                v = vs.get(s.voice)
                if v is not None:
                    out.append((v.name, s.text.strip()))
    return out


@dataclass
class VoiceClassifier:
    """Char n-gram TF-IDF + logistic regression: which voice does a text sound like?"""

    model: Any = None
    labels: list[str] = field(default_factory=list)

    def fit(self, segments: Sequence[tuple[str, str]]) -> VoiceClassifier:
        """Fit on (voice, text) pairs; needs at least two voices."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        ys = [v for v, _ in segments]
        self.labels = sorted(set(ys))
        if len(self.labels) < 2:
            raise ValueError("the training data needs segments of at least two voices")
        self.model = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
            LogisticRegression(max_iter=2000, C=4.0),
        )
        self.model.fit([t for _, t in segments], ys)
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely voice of each text."""
        if not texts:
            return []
        return [str(x) for x in self.model.predict(list(texts))]


def voice_accuracy(
    clf: VoiceClassifier, replies: Sequence[str], voices: VoiceSet | str | None = "seed"
) -> float | None:
    """How often the classifier names the voice a generated segment was marked with (None when
    there is no declared-voice segment to judge)."""
    vs = resolve_voice_set(voices)
    pairs = [
        (v.name, s.text.strip())
        for r in replies
        for s in voice_segments(r, vs)
        if (v := vs.get(s.voice)) is not None
    ]
    if not pairs:
        return None
    pred = clf.predict([t for _, t in pairs])
    return sum(p == y for p, (y, _) in zip(pred, pairs, strict=True)) / len(pairs)


# ---------------------------------------------------------------------------- generation


def read_prompts(path: str | Path) -> list[str]:
    """Prompts, one a line; blank lines and ``#`` comments skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def default_prompts_path() -> Path:
    """The shipped evaluation prompts (unlike the synthetic training prompts)."""
    return Path(__file__).with_name("prompts.txt")


def generate_replies(
    prompts: Sequence[str],
    model: str | Path | None = None,
    lora_path: str | Path | None = None,
    system: str = "",
    voices: VoiceSet | str | None = "seed",
    seed: int = 0,
    max_tokens: int = MAX_NEW_TOKENS,
    temperature: float = 0.7,
    top_p: float = 0.95,
    threads: int | None = None,
) -> list[str]:
    """One reply per prompt through the llamacpp backend + Generation; prompt ``i`` uses seed+i."""
    from ..backends import create_backend
    from ..backends.base import GenerationRequest, Message, Sampling
    from ..generate import Generation

    backend = create_backend(
        "llamacpp", model=model, lora_path=lora_path, n_ctx=2048, n_threads=threads, seed=seed
    )
    out: list[str] = []
    try:
        for i, p in enumerate(prompts):
            msgs = ((Message("system", system),) if system else ()) + (Message("user", p),)
            req = GenerationRequest(
                messages=msgs,
                sampling=Sampling(
                    temperature=temperature, top_p=top_p, seed=seed + i, max_tokens=max_tokens
                ),
                alternatives=0,
            )
            trace = Generation(backend, req, voices).run()
            if trace.finish and trace.finish.get("reason") == "error":
                raise RuntimeError(f"generation failed: {trace.finish.get('message')}")
            out.append(trace.text)
    finally:
        backend.close()
    return out


@dataclass
class AdherenceResult:
    """The metrics of one evaluation, and the replies they were measured on."""

    n: int
    base: float
    tuned: float
    voice_accuracy: float | None
    copied_sentence_rate: float
    distinct2: float
    relevance: float = 0.0
    relevance_shuffled: float = 0.0
    tic_rate: float = 0.0
    tic_word: str | None = None
    base_relevance: float = 0.0
    base_relevance_shuffled: float = 0.0
    base_tic_rate: float = 0.0
    base_tic_word: str | None = None
    base_replies: list[str] = field(default_factory=list)
    tuned_replies: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object: the tuned model's measures, then the plain model's."""
        r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
        return {
            "n": self.n,
            "base": r4(self.base),
            "tuned": r4(self.tuned),
            "voice_accuracy": r4(self.voice_accuracy),
            "copied_sentence_rate": r4(self.copied_sentence_rate),
            "distinct2": r4(self.distinct2),
            "relevance": r4(self.relevance),
            "relevance_shuffled": r4(self.relevance_shuffled),
            "tic_rate": r4(self.tic_rate),
            "tic_word": self.tic_word,
            "base_relevance": r4(self.base_relevance),
            "base_relevance_shuffled": r4(self.base_relevance_shuffled),
            "base_tic_rate": r4(self.base_tic_rate),
            "base_tic_word": self.base_tic_word,
        }


def score(
    prompts: Sequence[str],
    base_replies: Sequence[str],
    tuned_replies: Sequence[str],
    training: Sequence[Sequence[dict[str, str]]],
    voices: VoiceSet | str | None = "seed",
) -> AdherenceResult:
    """All metrics from the prompts, the replies already generated for them (one of each per
    prompt) and the training conversations."""
    if not len(prompts) == len(base_replies) == len(tuned_replies):
        raise ValueError(
            f"{len(prompts)} prompts, {len(base_replies)} base and {len(tuned_replies)} tuned replies"
        )
    vs = resolve_voice_set(voices)
    clf = VoiceClassifier().fit(training_segments(training, vs))
    corpus = "\n".join(
        m["content"] for msgs in training for m in msgs if m.get("role") == "assistant"
    )
    tic_rate, tic_word = tic(prompts, tuned_replies, vs)
    base_tic_rate, base_tic_word = tic(prompts, base_replies, vs)
    return AdherenceResult(
        n=len(tuned_replies),
        base=form_rate(base_replies, vs),
        tuned=form_rate(tuned_replies, vs),
        voice_accuracy=voice_accuracy(clf, tuned_replies, vs),
        copied_sentence_rate=copied_sentence_rate(tuned_replies, corpus, vs),
        distinct2=distinct_n(tuned_replies, 2, vs),
        relevance=relevance(prompts, tuned_replies, vs),
        relevance_shuffled=relevance_shuffled(prompts, tuned_replies, vs),
        tic_rate=tic_rate,
        tic_word=tic_word,
        base_relevance=relevance(prompts, base_replies, vs),
        base_relevance_shuffled=relevance_shuffled(prompts, base_replies, vs),
        base_tic_rate=base_tic_rate,
        base_tic_word=base_tic_word,
        base_replies=list(base_replies),
        tuned_replies=list(tuned_replies),
    )
