"""The one backend contract: ``stream(request) -> Iterator[TokenEvent | FinishEvent]``."""

from __future__ import annotations

import codecs
import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ..trace import Alternative, AttentionSummary, TokenRecord

if TYPE_CHECKING:
    from ..steer import Conductor

FinishReason = Literal["stop", "length", "cancelled", "error"]


class BackendError(RuntimeError):
    """A backend cannot be created or used (missing model, extra not installed, bad URL)."""


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``top_k=0`` means no top-k truncation (and is not sent to OpenAI-compatible
    servers, since OpenAI's own API rejects the parameter)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: chat messages or a raw prompt, sampling, and telemetry options."""

    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    alternatives: int = 5
    attention: bool = False
    logit_lens: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    # Buckets earlier reply tokens for attention summaries (reply index -> bucket, e.g. its
    # voice segment); set by the Generation pipeline, which knows the segments.
    segment_of: Callable[[int], int] | None = field(default=None, compare=False, repr=False)
    # The conductor of this run (set by Generation): backends with token-level control ask it
    # before every token what to force, ban and sample with (see thoughtform.steer).
    conductor: Conductor | None = field(default=None, compare=False, repr=False)
    # Branching (loom): reply tokens already generated, by id, put in the context after the
    # prompt exactly as they were (not sampled, not emitted); then ``forced`` ids are emitted
    # first, as forced tokens, before sampling goes on.
    prefix: tuple[int, ...] = ()
    forced: tuple[int, ...] = ()
    # Branching by text (``Capabilities.branch_prefix == "text"``, HTTP servers that take no
    # token ids): the assistant reply so far, continued as text (not emitted), then
    # ``forced_text`` emitted first, as a forced token, before sampling goes on.
    prefix_text: str = ""
    forced_text: str = ""

    @property
    def is_chat(self) -> bool:
        """True for a chat request, False for a raw completion."""
        return self.prompt is None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token with its telemetry (None where the backend has no data)."""

    text: str
    token_id: int | None = None
    bytes: bytes | None = None
    logprob: float | None = None
    top: tuple[Alternative, ...] = ()
    entropy: float | None = None
    attention: AttentionSummary | None = None
    lens: tuple[str, ...] | None = None
    # Steering: ``logprob``/``top``/``entropy`` always describe the model's own distribution;
    # where the conductor changed it (mask, bias, per-voice sampling, forced token) ``steered``
    # is set and ``steered_logprob`` is the chosen token's log-probability as sampled.
    steered: bool = False
    steered_logprob: float | None = None
    forced: bool = False
    vector: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of_record(cls, t: TokenRecord) -> TokenEvent:
        """A recorded token played back as an event (replay, a branch's shared prefix)."""
        return cls(
            text=t.text,
            token_id=t.token_id,
            bytes=t.bytes,
            logprob=t.logprob,
            top=tuple(t.top),
            entropy=t.entropy,
            attention=t.attention,
            lens=tuple(t.lens) if t.lens is not None else None,
            steered=t.steered,
            steered_logprob=t.steered_logprob,
            forced=t.forced,
            vector=tuple((str(v), float(s)) for v, s in t.vector) if t.vector else (),
        )

    def record(self, index: int, t: float | None = None) -> TokenRecord:
        """This event as the trace's token record (the one conversion, used everywhere)."""
        return TokenRecord(
            index=index,
            text=self.text,
            token_id=self.token_id,
            logprob=self.logprob,
            top=list(self.top),
            entropy=self.entropy,
            bytes=self.bytes,
            attention=self.attention,
            lens=list(self.lens) if self.lens is not None else None,
            t=t,
            steered=self.steered,
            steered_logprob=self.steered_logprob,
            forced=self.forced,
            vector=[list(v) for v in self.vector] if self.vector else None,
        )


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The last event of every stream: why it ended, an error message, and timings (seconds)."""

    reason: FinishReason
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


StreamEvent = TokenEvent | FinishEvent


@dataclass(frozen=True)
class Capabilities:
    """What a backend can report or do."""

    logprobs: bool = False
    max_alternatives: int = 0
    exact_entropy: bool = False
    attention: bool = False
    logit_lens: bool = False
    logit_bias: bool = False
    grammar: bool = False
    chat: bool = True
    completion: bool = True
    # Steering through the conductor, token by token (mask, force, per-voice sampling).
    token_control: bool = False
    # Who speaks next: exact marker probabilities (parallel sequences) or approximate.
    voice_scores: Literal["exact", "approximate", "none"] = "none"
    voice_vectors: bool = False
    branching: bool = False  # a reply can be continued from a fork (loom)
    # How a branch's prefix reaches the model: "ids" = the parent's token ids exactly
    # (``GenerationRequest.prefix``/``forced``), "text" = its text re-sent (``prefix_text``/
    # ``forced_text``: the server re-tokenizes it, so the same ids are not guaranteed).
    branch_prefix: Literal["ids", "text"] = "ids"

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping."""
        return dict(self.__dict__)


@runtime_checkable
class Backend(Protocol):
    """A text generator that streams tokens with telemetry.

    ``stream`` yields TokenEvents then exactly one FinishEvent. Closing the generator, or
    setting ``cancel``, stops generation at the next token and frees the backend; the final
    event then says ``cancelled``. Errors never raise out of ``stream``: they end it with a
    FinishEvent(reason="error").
    """

    name: str

    @property
    def capabilities(self) -> Capabilities:
        """What this backend reports."""
        ...

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Generate, yielding token events and a final FinishEvent."""
        ...

    def close(self) -> None:
        """Release the model or connection."""
        ...


def decode_pieces(byte_chunks: list[bytes]) -> list[str]:
    """Decode per-token byte chunks into per-token text without losing characters split
    across tokens: each token's text holds the characters completed by its bytes."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(b) for b in byte_chunks]
    tail = dec.decode(b"", final=True)
    if tail and out:
        out[-1] += tail
    return out


def alt_text(b: bytes) -> str:
    """Display text of an alternative from its bytes: decoded when whole UTF-8, else the bytes
    as ``<0xE2><0x80>`` so partial characters and empty pieces stay distinct."""
    if not b:
        return "<empty>"
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{x:02X}>" for x in b)


class TokenEmitter:
    """Decodes token bytes incrementally and holds back text that may begin a stop string, so a
    stop string split across tokens never leaks its first part (shared by the local backends)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[TokenEvent] = []
        self.stopped = False

    def decode(self, raw: bytes) -> str:
        """The text of a token's bytes ``raw`` (a character split across tokens lands on the
        token that ends it): the ``text`` of the event :meth:`push` gets next."""
        return self.dec.decode(raw)

    def push(self, ev: TokenEvent) -> list[TokenEvent]:
        """Add one token, its ``text`` from :meth:`decode`; return the tokens now safe to emit.

        Why two calls: the caller builds the event with its text at once (copying a frozen
        event to set it cost 4 us warm a token, more right after a decode)."""
        self.pending.append(ev)
        if not self.stops and not self.dec.getstate()[0]:
            ready = self.pending
            self.pending = []
            return ready
        ptext = "".join(p.text for p in self.pending)
        hit = min((k for k in (ptext.find(s) for s in self.stops) if k >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            return self._cut(hit)
        hold = 0
        for n in range(min(len(ptext), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(ptext[-n:]) for s in self.stops):
                hold = n
                break
        # A token ending inside a UTF-8 character stays pending so that, if the stream ends
        # there, the flushed replacement char lands on it and not on a new, fake token.
        partial = bool(self.dec.getstate()[0])
        limit = len(ptext) - hold
        out: list[TokenEvent] = []
        pos = 0
        for i, p in enumerate(self.pending):
            end = pos + len(p.text)
            if end > limit or (partial and i == len(self.pending) - 1):
                break
            out.append(p)
            pos = end
        del self.pending[: len(out)]
        return out

    def _cut(self, hit: int) -> list[TokenEvent]:
        """Tokens before a stop string starting at ``hit``; a straddling one is truncated."""
        out: list[TokenEvent] = []
        pos = 0
        for p in self.pending:
            end = pos + len(p.text)
            if end <= hit:
                out.append(p)
            elif pos < hit:
                # Its bytes no longer match its text, so they are dropped (unknown).
                out.append(dataclasses.replace(p, text=p.text[: hit - pos], bytes=None))
                break
            else:
                break
            pos = end
        self.pending = []
        return out

    def flush(self) -> list[TokenEvent]:
        """Everything still held, the decoder's tail (an incomplete char) on the last token."""
        tail = self.dec.decode(b"", final=True)
        out = self.pending
        self.pending = []
        if tail and out and not self.stopped:
            out[-1] = dataclasses.replace(out[-1], text=out[-1].text + tail)
        return out
