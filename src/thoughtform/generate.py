"""The one-way pipeline: backend token events -> voice parser -> trace (and a JSONL on disk)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .backends.base import Backend, FinishEvent, GenerationRequest, TokenEvent
from .parse import Event, SegmentBuilder, VoiceEnd, VoiceParser
from .steer import Conductor, SteerPlan
from .trace import TokenRecord, Trace, TraceWriter
from .voices import VoiceSet, resolve_voice_set


@dataclass
class Update:
    """What one backend event changed: the raw token, parser events, tokens whose voice is now
    known (in order), and the finish event at the end."""

    token: TokenRecord | None = None
    events: list[Event] = field(default_factory=list)
    resolved: list[TokenRecord] = field(default_factory=list)
    finish: FinishEvent | None = None
    choices: list[dict[str, Any]] = field(default_factory=list)  # voice_choice records


def request_meta(request: GenerationRequest) -> dict[str, Any]:
    """The request as trace metadata."""
    return {
        "messages": [dataclasses.asdict(m) for m in request.messages],
        "prompt": request.prompt,
        "sampling": dataclasses.asdict(request.sampling),
        "alternatives": request.alternatives,
    }


def make_conductor(
    request: GenerationRequest,
    voices: VoiceSet,
    plan: SteerPlan | None,
    starts_in: str | None = None,
) -> Conductor:
    """The conductor for one run of ``request`` under ``plan`` (the request's sampling is the
    base that per-voice sampling overrides)."""
    s = request.sampling
    return Conductor(
        voices,
        plan,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_tokens=s.max_tokens,
        seed=s.seed,
        starts_in=starts_in,
    )


class Generation:
    """Runs one backend stream through the parser into a trace; iterate to get updates.

    Stopping early (closing the iterator, ``cancel``, Ctrl-C) keeps the partial reply: the trace
    is finished with reason ``cancelled`` and everything generated so far is on disk.
    """

    def __init__(
        self,
        backend: Backend,
        request: GenerationRequest,
        voices: VoiceSet | str | None = None,
        starts_in: str | None = None,
        trace_path: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
        steer: SteerPlan | None = None,
        conduct: bool = True,
    ) -> None:
        self.backend = backend
        self.voices = resolve_voice_set(voices)
        if request.attention and request.segment_of is None:
            # Attention mass is summarised per earlier voice segment, which only we know.
            request = dataclasses.replace(request, segment_of=self.segment_of)
        # The conductor is the one way back from what the parser sees into sampling. Without a
        # plan it only scores who speaks next (where the backend can) and steers nothing.
        self.conductor: Conductor | None = request.conductor
        if self.conductor is None and conduct and (steer is not None or self.voices.voices):
            self.conductor = make_conductor(request, self.voices, steer, starts_in)
            request = dataclasses.replace(request, conductor=self.conductor)
        self.request = request
        self.parser = VoiceParser(self.voices, starts_in=starts_in)
        self.builder = SegmentBuilder()
        self.cancel = cancel or threading.Event()
        m: dict[str, Any] = {
            "kind": "generation",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "backend": getattr(backend, "name", type(backend).__name__),
            "model": getattr(backend, "model_name", None),
            "voices": self.voices.name,
            "voice_set": self.voices.to_dict(),
            "starts_in": starts_in,
            **request_meta(request),
        }
        if steer is not None:
            m["steer"] = self.conductor.plan.to_dict() if self.conductor else steer.to_dict()
        if meta:
            m.update(meta)
        self.trace = Trace(meta=m)
        self._writer = TraceWriter(trace_path, m) if trace_path else None
        self._unresolved: list[TokenRecord] = []
        self._voice_of: dict[int, str] = {}
        self._segment_of: dict[int, int] = {}
        self._ends: list[int] = []  # end offset of each token's text
        self._offset = 0
        self._written_segments = 0
        self._written_choices = 0
        self._done = False

    def __iter__(self) -> Iterator[Update]:
        t0 = time.perf_counter()
        finish: FinishEvent | None = None
        stream = self.backend.stream(self.request, self.cancel)
        try:
            for ev in stream:
                if isinstance(ev, FinishEvent):
                    finish = ev
                    break
                yield self._on_token(ev, time.perf_counter() - t0)
        except (GeneratorExit, KeyboardInterrupt):
            self.cancel.set()
            finish = FinishEvent("cancelled", "stopped by the user")
            self._finish(finish, time.perf_counter() - t0)
            raise
        except Exception as e:  # a backend bug must not lose the partial reply
            finish = FinishEvent("error", f"{type(e).__name__}: {e}")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if finish is None:
            finish = FinishEvent("cancelled" if self.cancel.is_set() else "error", "stream ended")
        yield self._finish(finish, time.perf_counter() - t0)

    def run(self) -> Trace:
        """Consume the whole stream and return the trace."""
        for _ in self:
            pass
        return self.trace

    def _on_token(self, ev: TokenEvent, t: float) -> Update:
        idx = len(self.trace.tokens)
        rec = ev.record(idx, t)
        self.trace.tokens.append(rec)
        self._unresolved.append(rec)
        self._offset += len(ev.text)
        self._ends.append(self._offset)
        events = self.parser.feed(ev.text, idx)
        if self.conductor is not None:
            self.conductor.feed(ev.text, events)
        upd = Update(token=rec, events=events, resolved=self._absorb(events, final=False))
        upd.choices = self._take_choices(final=False)
        return upd

    def _take_choices(self, final: bool) -> list[dict[str, Any]]:
        """Voice-choice records whose chosen voice is known (all of them at the end)."""
        c = self.conductor
        if c is None:
            return []
        out: list[dict[str, Any]] = []
        while self._written_choices < len(c.choices):
            ch = c.choices[self._written_choices]
            if not final and ch.chosen is None and ch is c.choices[-1]:
                break  # its voice is not parsed yet
            if not ch.settle(wait=final):
                break  # still being scored beside the reply (in order: the rest wait)
            rec = ch.to_dict()
            self.trace.voice_choices.append({k: v for k, v in rec.items() if k != "type"})
            if self._writer is not None:
                self._writer.record(rec)
            out.append(rec)
            self._written_choices += 1
        return out

    def segment_of(self, token: int) -> int:
        """Index of the segment reply token ``token`` belongs to (the open one if not yet known)."""
        seg = self._segment_of.get(token)
        if seg is not None:
            return seg
        return max(0, len(self.builder.segments) - 1)

    def _absorb(self, events: list[Event], final: bool) -> list[TokenRecord]:
        """Apply parser events: segments, token voices; return tokens whose voice is settled."""
        for e in events:
            self.builder.add((e,))
            # First voice wins: a token holding text and the start of a marker stays with the
            # text; a marker-only token belongs to the voice it opens (or closes).
            for tok in e.tokens:
                if tok not in self._voice_of:
                    self._voice_of[tok] = e.voice
                    self._segment_of[tok] = len(self.builder.segments) - 1
            if isinstance(e, VoiceEnd) and self._writer is not None:
                self._write_segments(closed_only=True)
        settled = self.parser.emitted if not final else self._offset
        out: list[TokenRecord] = []
        while self._unresolved and self._ends[self._unresolved[0].index] <= settled:
            rec = self._unresolved.pop(0)
            rec.voice = self._voice_of.pop(rec.index, None) or (
                out[-1].voice if out else self.parser.voice
            )
            if self._writer is not None:
                self._writer.token(rec)
            out.append(rec)
        return out

    def _write_segments(self, closed_only: bool) -> None:
        segs = self.builder.segments
        upto = len(segs) - (1 if closed_only and self.builder.current is not None else 0)
        while self._written_segments < upto:
            if self._writer is not None:
                self._writer.segment(segs[self._written_segments])
            self._written_segments += 1

    def _finish(self, finish: FinishEvent, elapsed: float) -> Update:
        if self._done:
            return Update(finish=finish)
        self._done = True
        events = self.parser.close()
        resolved = self._absorb(events, final=True)
        if self.conductor is not None:
            self.conductor.observe(events)
            self.conductor.finish()
        choices = self._take_choices(final=True)
        self.trace.segments = self.builder.segments
        n = len(self.trace.tokens)
        timings = {"total_s": round(elapsed, 6), **finish.timings}
        if n and elapsed > 0:
            timings["tokens_per_s"] = round(n / elapsed, 3)
        self.trace.finish = {
            "reason": finish.reason,
            "message": finish.message,
            "timings": timings,
            "tokens": n,
            # prompt_tokens maps attention positions (absolute) back to generated tokens.
            "usage": dict(finish.usage),
        }
        if self._writer is not None:
            self._write_segments(closed_only=False)
            self._writer.end(self.trace.finish)
        return Update(events=events, resolved=resolved, finish=finish, choices=choices)


def replay_generation(
    tokens: Sequence[TokenRecord], voices: VoiceSet | str | None, starts_in: str | None = None
) -> Generation:
    """Recorded tokens through the same pipeline as a live reply (parser, segments, each
    token's voice), nothing steered: how stored replies are re-read with another voice set."""
    from .backends.base import Sampling
    from .backends.replay import ReplayBackend

    return Generation(
        ReplayBackend(trace=Trace(tokens=list(tokens))),
        GenerationRequest(sampling=Sampling(max_tokens=0)),
        voices,
        starts_in=starts_in,
        conduct=False,
    )


def revoice(
    tokens: Sequence[TokenRecord], voices: VoiceSet | str | None, starts_in: str | None = None
) -> list[str]:
    """Which voice owns each token under ``voices``: the one rule every view uses (a token
    holding text and the start of a marker stays with the text; a marker-only token belongs
    to the voice it opens)."""
    trace = replay_generation(tokens, voices, starts_in).run()
    vs = resolve_voice_set(voices)
    return [t.voice or vs.default_voice for t in trace.tokens]
