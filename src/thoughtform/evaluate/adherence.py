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
"""

from __future__ import annotations

import re
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
    """One reply per prompt through LlamaCppBackend + Generation; prompt ``i`` uses seed+i."""
    from ..backends.base import GenerationRequest, Message, Sampling
    from ..backends.llamacpp import LlamaCppBackend
    from ..generate import Generation

    backend = LlamaCppBackend(
        model=model, lora_path=lora_path, n_ctx=2048, n_threads=threads, seed=seed
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
    base_replies: list[str] = field(default_factory=list)
    tuned_replies: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object."""
        r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
        return {
            "n": self.n,
            "base": r4(self.base),
            "tuned": r4(self.tuned),
            "voice_accuracy": r4(self.voice_accuracy),
            "copied_sentence_rate": r4(self.copied_sentence_rate),
            "distinct2": r4(self.distinct2),
        }


def score(
    base_replies: Sequence[str],
    tuned_replies: Sequence[str],
    training: Sequence[Sequence[dict[str, str]]],
    voices: VoiceSet | str | None = "seed",
) -> AdherenceResult:
    """All metrics from replies already generated and the training conversations."""
    vs = resolve_voice_set(voices)
    clf = VoiceClassifier().fit(training_segments(training, vs))
    corpus = "\n".join(
        m["content"] for msgs in training for m in msgs if m.get("role") == "assistant"
    )
    return AdherenceResult(
        n=len(tuned_replies),
        base=form_rate(base_replies, vs),
        tuned=form_rate(tuned_replies, vs),
        voice_accuracy=voice_accuracy(clf, tuned_replies, vs),
        copied_sentence_rate=copied_sentence_rate(tuned_replies, corpus, vs),
        distinct2=distinct_n(tuned_replies, 2, vs),
        base_replies=list(base_replies),
        tuned_replies=list(tuned_replies),
    )
