"""Replay backend: plays a trace JSONL or a plain transcript at a given rate (tests, demos)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..trace import Trace, is_trace_text, load_trace
from .base import (
    BackendError,
    Capabilities,
    FinishEvent,
    GenerationRequest,
    StreamEvent,
    TokenEvent,
)

# Word-sized pieces: a run of spaces/tabs, then a word or one other character; newlines alone.
_PIECE = re.compile(r"[ \t]*(?:\w+|\n|[^\w\n])", re.UNICODE)


def split_words(text: str) -> list[str]:
    """Cut text into word-sized pieces that join back to exactly ``text``."""
    pieces = _PIECE.findall(text)
    joined = "".join(pieces)
    if joined != text:  # trailing spaces/tabs at the very end
        pieces.append(text[len(joined) :])
    return pieces


class ReplayBackend:
    """Plays recorded tokens (with their telemetry) or a transcript cut into word pieces."""

    name = "replay"

    def __init__(
        self,
        path: str | Path | None = None,
        text: str | None = None,
        trace: Trace | None = None,
        rate: float = 0.0,
        model: str | None = None,
    ) -> None:
        path = path or model
        self.rate = rate
        self._events: list[TokenEvent]
        if trace is None and path is not None:
            p = Path(path)
            try:
                head = p.read_text(encoding="utf-8", errors="replace")[:4096]
            except OSError as e:
                raise BackendError(f"{p}: cannot read replay file: {e.strerror}") from None
            if is_trace_text(head):
                trace = load_trace(p)
            else:
                text = p.read_text(encoding="utf-8", errors="replace")
        if trace is not None:
            self._events = [TokenEvent.of_record(t) for t in trace.tokens]
            if not self._events and trace.source_text:
                text = trace.source_text
        if text is not None and not getattr(self, "_events", None):
            self._events = [TokenEvent(text=w) for w in split_words(text)]
        if not hasattr(self, "_events"):
            raise BackendError("replay backend needs a trace, a transcript path or text")

    @property
    def capabilities(self) -> Capabilities:
        """Replay reports whatever the recording holds."""
        has_lp = any(e.logprob is not None for e in self._events)
        return Capabilities(
            logprobs=has_lp,
            max_alternatives=max((len(e.top) for e in self._events), default=0),
            attention=any(e.attention is not None for e in self._events),
        )

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Yield the recorded tokens (up to max_tokens) at ``rate`` tokens/s (0 = unthrottled)."""
        t0 = time.perf_counter()
        limit = request.sampling.max_tokens
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        n = 0
        reason = "stop"
        try:
            for ev in self._events:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if limit and n >= limit:
                    reason = "length"
                    break
                if interval:
                    delay = t0 + n * interval - time.perf_counter()
                    if delay > 0:
                        if cancel is not None:
                            if cancel.wait(delay):
                                reason = "cancelled"
                                break
                        else:
                            time.sleep(delay)
                yield ev
                n += 1
        except GeneratorExit:
            return
        dt = time.perf_counter() - t0
        yield FinishEvent(reason, timings={"total_s": dt}, usage={"completion_tokens": n})  # type: ignore[arg-type]

    def close(self) -> None:
        """Nothing to release."""
