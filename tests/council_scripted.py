"""A scripted backend for council tests: each stream's reply comes from a function of the
request (so a turn can answer as the speaker its persona names), cut into word pieces."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from thoughtform.backends.base import (
    Capabilities,
    FinishEvent,
    GenerationRequest,
    StreamEvent,
    TokenEvent,
)
from thoughtform.backends.replay import split_words

_SPEAKER = re.compile(r"You are ([^,.\n]+), one inner voice")


def speaker_of(request: GenerationRequest) -> str:
    """The speaker a turn's persona prompt names."""
    sys = request.messages[0].content if request.messages else ""
    m = _SPEAKER.search(sys)
    return m.group(1) if m else "?"


@dataclass
class ScriptedBackend:
    """Replies ``reply(request, call_number)``; scores continuations with ``scores``."""

    reply: Callable[[GenerationRequest, int], str]
    scores: Callable[[GenerationRequest, Sequence[str], str], list[float]] | None = None
    delay: float = 0.0
    name: str = "scripted"
    model_name: str = "script"
    requests: list[GenerationRequest] = field(default_factory=list)
    scored: list[tuple[GenerationRequest, list[str], str]] = field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities:
        """Plain text, no control."""
        return Capabilities()

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """The scripted reply in word pieces (stopping when cancelled)."""
        self.requests.append(request)
        text = self.reply(request, len(self.requests) - 1)
        n = 0
        for piece in split_words(text):
            if cancel is not None and cancel.is_set():
                yield FinishEvent("cancelled", "cancelled")
                return
            if self.delay:
                time.sleep(self.delay)
            yield TokenEvent(text=piece, logprob=-0.5)
            n += 1
            if n >= request.sampling.max_tokens:
                yield FinishEvent("length")
                return
        yield FinishEvent("stop")

    def score_continuations(
        self, request: GenerationRequest, texts: Sequence[str], prefix: str = ""
    ) -> list[float]:
        """The scripted log-probabilities (recorded)."""
        self.scored.append((request, list(texts), prefix))
        assert self.scores is not None
        return self.scores(request, texts, prefix)

    def close(self) -> None:
        """Nothing to free."""


def as_speaker(text: str = "I am {v}, speaking.") -> Callable[[GenerationRequest, int], str]:
    """A reply that names its own speaker, marked with its marker."""

    def reply(request: GenerationRequest, i: int) -> str:
        v = speaker_of(request)
        return f"[{v}]\n" + text.format(v=v, i=i)

    return reply
