"""The OpenAI wire format, both ways: request bodies -> GenerationRequest + SteerPlan, and the
Generation's updates -> chunks and replies (content, reasoning, ``thoughtform`` fields, logprobs).

Pure functions and small classes, no I/O: the ASGI app in :mod:`thoughtform.proxy.app` calls them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import GenerationRequest, Message, Sampling
from ..generate import Update
from ..parse import Segment, Text, VoiceEnd, VoiceStart
from ..steer import SteerError, SteerPlan
from ..trace import TokenRecord
from ..voices import VoiceSet

MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
MAX_REQUEST_TOKENS = 32768
# OpenAI's placeholder logprob for "not in the returned top" (used where the upstream gave none).
NO_LOGPROB = -9999.0
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the proxy answers with an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class ApiRequest:
    """One parsed request: what to generate and how the client wants the answer."""

    chat: bool
    request: GenerationRequest
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # how many alternatives per token the client wants; None: none
    steer: SteerPlan | None = None
    model: str | None = None  # as the client named it
    messages: list[tuple[str, str]] = field(default_factory=list)  # for the recording


# ------------------------------------------------------------------------------- parsing


def _number(
    body: Mapping[str, Any],
    key: str,
    default: float | None,
    lo: float,
    hi: float,
    integer: bool = False,
    lo_open: bool = False,
) -> float | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(f"{key}: a number is required, got {type(v).__name__}", key)
    if integer and float(v) != int(v):
        raise _bad(f"{key}: a whole number is required", key)
    if v < lo or v > hi or (lo_open and v == lo):
        lo_s = f"({lo:g}" if lo_open else f"[{lo:g}"
        raise _bad(f"{key}: {v!r} is out of range {lo_s}, {hi:g}]", key)
    return int(v) if integer else float(v)


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop: a string or a list of strings is required", "stop")
    if len(items) > MAX_STOPS:
        raise _bad(f"stop: at most {MAX_STOPS} sequences", "stop")
    return tuple(s for s in items if s)


def _sampling(body: Mapping[str, Any], default_max: int) -> Sampling:
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    n_max = _number(body, key, default_max, 1, MAX_REQUEST_TOKENS, integer=True)
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    return Sampling(
        temperature=float(_number(body, "temperature", 0.7, 0.0, 2.0) or 0.0),
        top_p=float(_number(body, "top_p", 0.95, 0.0, 1.0, lo_open=True) or 1.0),
        top_k=int(_number(body, "top_k", 0, 0, 1000, integer=True) or 0),
        seed=None if seed is None else int(seed) % (2**31),
        max_tokens=int(n_max or default_max),
        stop=_stops(body),
    )


def _content(raw: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        out = []
        for j, part in enumerate(raw):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(
                    f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}",
                    f"messages[{i}].content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"messages[{i}].content[{j}].text: a string is required")
            out.append(text)
        return "".join(out)
    raise _bad(f"messages[{i}].content: a string or a list of text parts is required")


def _messages(raw: Any) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages: a non-empty list is required", "messages")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]: an object is required", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                f"messages[{i}].role: {str(role)[:40]!r} is not supported"
                " (system, developer, user, assistant)",
                "messages",
            )
        if m.get("tool_calls"):
            raise _bad(f"messages[{i}]: tool calls are not supported", "messages")
        out.append((ROLES[role], _content(m.get("content"), i)))
    return out


def _steer(raw: Any, voices: VoiceSet) -> SteerPlan | None:
    """The request's ``thoughtform`` object as a plan (names checked against the voice set)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("thoughtform: an object is required", "thoughtform")
    try:
        plan = SteerPlan.from_dict(raw).resolved(voices)
    except SteerError as e:
        raise _bad(f"thoughtform: {e}", "thoughtform") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise _bad(f"thoughtform: malformed steering ({e})", "thoughtform") from None
    for name, (t, p) in plan.voice_sampling.items():
        if t is not None and not 0.0 <= t <= 5.0:
            raise _bad(f"thoughtform.voice_sampling.{name}: temperature must be in 0..5")
        if p is not None and not 0.0 < p <= 1.0:
            raise _bad(f"thoughtform.voice_sampling.{name}: top_p must be in (0, 1]")
    return plan


def _common(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools and functions are not supported by this proxy", "tools")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: true or false", "stream")
    return body


def _include_usage(body: Mapping[str, Any]) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and bool(so.get("include_usage"))


def parse_chat(
    body: Any,
    voices: VoiceSet,
    default_max_tokens: int,
    alternatives: int,
    system_prompt: str = "",
) -> ApiRequest:
    """A ``/v1/chat/completions`` body (raises ApiError with a 400 for a bad one)."""
    b = _common(body)
    msgs = _messages(b.get("messages"))
    lp = b.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise _bad("logprobs: true or false", "logprobs")
    top = _number(b, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not lp:
        raise _bad("top_logprobs: needs logprobs: true", "top_logprobs")
    want = int(top or 0) if lp else None
    sent = list(msgs)
    if system_prompt:
        # The voice prompt goes first; the client's own system text follows it.
        if sent and sent[0][0] == "system":
            sent[0] = ("system", system_prompt + "\n\n" + sent[0][1])
        else:
            sent.insert(0, ("system", system_prompt))
    request = GenerationRequest(
        messages=tuple(Message(r, c) for r, c in sent),
        sampling=_sampling(b, default_max_tokens),
        alternatives=max(alternatives, want or 0),
    )
    return _api_request(b, True, request, want, voices, sent)


def parse_completion(
    body: Any, voices: VoiceSet, default_max_tokens: int, alternatives: int
) -> ApiRequest:
    """A legacy ``/v1/completions`` body (one prompt; ``logprobs`` is a count)."""
    b = _common(body)
    prompt = b.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt: one string is required", "prompt")
    if b.get("echo"):
        raise _bad("echo is not supported", "echo")
    if b.get("suffix"):
        raise _bad("suffix is not supported", "suffix")
    n = _number(b, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    want = None if n is None else int(n)
    request = GenerationRequest(
        prompt=prompt,
        sampling=_sampling(b, default_max_tokens),
        alternatives=max(alternatives, want or 0),
    )
    return _api_request(b, False, request, want, voices, [("user", prompt)])


def _api_request(
    b: Mapping[str, Any],
    chat: bool,
    request: GenerationRequest,
    want: int | None,
    voices: VoiceSet,
    messages: list[tuple[str, str]],
) -> ApiRequest:
    """The fields both endpoints read the same way (stream, usage, steering, model)."""
    return ApiRequest(
        chat=chat,
        request=request,
        stream=bool(b.get("stream", False)),
        include_usage=_include_usage(b),
        logprobs=want,
        steer=_steer(b.get("thoughtform"), voices),
        model=b.get("model") if isinstance(b.get("model"), str) else None,
        messages=messages,
    )


# ------------------------------------------------------------------------ shaping replies


@dataclass
class Piece:
    """A run of output in one voice and segment: its content or reasoning text, and the tokens
    whose logprobs travel with it."""

    voice: str
    segment: int
    content: str = ""
    reasoning: str = ""
    tokens: list[TokenRecord] = field(default_factory=list)


class Shaper:
    """Turns Generation updates into pieces: marker and text events grouped by voice and segment,
    reasoning voices routed to ``reasoning``, markers optionally stripped.

    Text is sent as the parser settles it (a possible marker is held back, never more than the
    longest marker), so every piece's voice is known when it leaves. Joined, the content and
    reasoning of all pieces are the model's output exactly, less stripped markers.
    """

    def __init__(
        self, voices: VoiceSet, reasoning: Sequence[str] = (), strip_markers: bool = False
    ) -> None:
        self.default_voice = voices.default_voice
        self.reasoning = frozenset(reasoning)
        self.strip = strip_markers
        self.segment = -1
        self._carry: list[TokenRecord] = []
        self._after_marker = False

    def feed(self, upd: Update) -> list[Piece]:
        """The pieces an update makes (often none while a marker may be forming)."""
        if upd.token is not None:
            self._carry.append(upd.token)
        out: list[Piece] = []
        for ev in upd.events:
            if isinstance(ev, VoiceStart):
                self.segment += 1
                if ev.marker:
                    self._after_marker = self.strip
                    if not self.strip:
                        self._add(out, ev.voice, ev.marker)
            elif isinstance(ev, Text):
                text = ev.text
                if self._after_marker:
                    # The marker had a line of its own: its line feed goes with it.
                    stripped = text.lstrip(" \t")
                    if stripped.startswith("\r\n"):
                        text, self._after_marker = stripped[2:], False
                    elif stripped.startswith("\n"):
                        text, self._after_marker = stripped[1:], False
                    elif stripped:
                        text, self._after_marker = stripped, False
                    else:
                        text = ""
                self._add(out, ev.voice, text)
            elif isinstance(ev, VoiceEnd) and ev.marker and not self.strip:
                self._add(out, ev.voice, ev.marker)
        if out and self._carry:
            out[0].tokens, self._carry = self._carry, []
        return out

    def leftover(self) -> Piece | None:
        """Tokens not yet sent with any text (their text was stripped or is empty)."""
        if not self._carry:
            return None
        p = Piece(self.default_voice, max(self.segment, 0), tokens=self._carry)
        self._carry = []
        return p

    def _add(self, out: list[Piece], voice: str, text: str) -> None:
        if not text:
            return
        seg = max(self.segment, 0)
        if out and out[-1].voice == voice and out[-1].segment == seg:
            p = out[-1]
        else:
            p = Piece(voice, seg)
            out.append(p)
        if voice in self.reasoning:
            p.reasoning += text
        else:
            p.content += text


def segments_payload(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """The reply's segments as sent to clients: index (the ``segment`` of chunks), voice, text,
    and the character range of the raw content."""
    return [{"index": i, **s.to_dict()} for i, s in enumerate(segments)]


def _lp(x: float | None) -> float:
    return NO_LOGPROB if x is None or not math.isfinite(x) else float(x)


def _bytes(text: str, raw: bytes | None) -> list[int]:
    return list(raw if raw is not None else text.encode("utf-8"))


def chat_logprobs(tokens: Sequence[TokenRecord], n: int) -> dict[str, Any]:
    """``choices[].logprobs`` of the chat API: ``{"content": [...], "refusal": None}``."""
    items = []
    for t in tokens:
        items.append(
            {
                "token": t.text,
                "logprob": _lp(t.logprob),
                "bytes": _bytes(t.text, t.bytes),
                "top_logprobs": [
                    {"token": a.text, "logprob": _lp(a.logprob), "bytes": _bytes(a.text, a.bytes)}
                    for a in t.top[:n]
                ],
            }
        )
    return {"content": items, "refusal": None}


class CompletionOffsets:
    """Character offsets of tokens in a legacy completion (its ``text_offset`` list)."""

    def __init__(self) -> None:
        self.pos = 0

    def logprobs(self, tokens: Sequence[TokenRecord], n: int) -> dict[str, Any]:
        """``choices[].logprobs`` of the legacy completions API (parallel lists)."""
        out: dict[str, Any] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [] if n else None,
            "text_offset": [],
        }
        for t in tokens:
            out["tokens"].append(t.text)
            out["token_logprobs"].append(_lp(t.logprob))
            if n:
                out["top_logprobs"].append({a.text: _lp(a.logprob) for a in t.top[:n]})
            out["text_offset"].append(self.pos)
            self.pos += len(t.text)
        return out


FINISH = {"stop": "stop", "length": "length"}


def usage(finish_usage: Mapping[str, int], completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object from a FinishEvent's usage (our own count where it has none)."""
    prompt = int(finish_usage.get("prompt_tokens") or 0)
    done = int(finish_usage.get("completion_tokens") or completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
