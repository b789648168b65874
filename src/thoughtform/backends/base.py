"""The one backend contract: ``stream(request) -> Iterator[TokenEvent | FinishEvent]``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..trace import Alternative, AttentionSummary

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
