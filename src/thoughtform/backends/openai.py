"""OpenAI-compatible HTTP backend (OpenAI, vLLM, llama.cpp servers, LM Studio, ...).

Streams ``/v1/chat/completions`` (chat requests) or ``/v1/completions`` (raw prompts) over
``httpx`` and parses the Server-Sent Events itself, so telemetry survives any chunking:

* One TokenEvent per logprob item the server sends (``logprobs: true`` +
  ``top_logprobs``); without logprobs, one TokenEvent per content delta (logprob None).
* Token text comes from the item's ``bytes`` through one incremental UTF-8 decoder, so a
  character split across tokens is shown once, on the token that completes it. The chunk's
  ``delta.content`` stays the authority for the text: item texts are fitted to it, because some
  servers decode partial characters as "" or U+FFFD in the item while the content is right.
* Reasoning deltas (``delta.reasoning_content`` / ``delta.reasoning`` from vLLM's reasoning
  parser) are shown wrapped in ``<think>`` ... ``</think>`` marker tokens (text only, no
  telemetry), so the ``think`` voice set sees them as a think block.
* Entropy is None: servers send only the top-k (the metrics module bounds it from them).

Every fault ends the stream with FinishEvent(reason="error") after the tokens already received;
``cancel`` or closing the generator shuts the socket at once so the server stops generating.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ..trace import Alternative
from .base import (
    BackendError,
    Capabilities,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    StreamEvent,
    TokenEvent,
    alt_text,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# OpenAI's and vLLM's default ceiling for top_logprobs (vLLM: --max-logprobs).
DEFAULT_MAX_ALTERNATIVES = 20
# OpenAI's placeholder logprob for a token outside the returned top 20.
_NOT_IN_TOP = -9999.0
# How often the consumer wakes up to look at ``cancel`` while waiting for bytes.
_POLL_S = 0.05

Mode = Literal["chat", "completion"]


# --------------------------------------------------------------------------- SSE parsing


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its ``event:`` name, joined ``data:`` lines, and whether it was a
    bare JSON line (NDJSON, no ``data:`` prefix)."""

    data: str
    event: str = "message"
    bare: bool = False


class SSEParser:
    """Incremental Server-Sent Events parser over raw bytes split at arbitrary boundaries.

    Handles LF, CRLF and lone CR line ends (even split between feeds), comments, multi-line
    data, a UTF-8 BOM, and bare ``{...}`` JSON lines (some servers send errors as NDJSON).
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []
        self._event = ""
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse more bytes; return the events completed by them."""
        return self._consume(self._dec.decode(chunk), final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a last line and an event left without its blank line, when its
        data is complete JSON or ``[DONE]`` (a half-received event is dropped)."""
        out = self._consume(self._dec.decode(b"", final=True), final=True)
        if self._data:
            data = "\n".join(self._data)
            if data.strip() == "[DONE]" or _is_json(data):
                out.append(SSEEvent(data, self._event or "message"))
        self._data, self._event = [], ""
        return out

    def _consume(self, text: str, final: bool) -> list[SSEEvent]:
        if not self._started and text:
            # A BOM may only start the stream.
            self._started = True
            text = text.removeprefix("\ufeff")
        self._buf += text
        out: list[SSEEvent] = []
        pos = 0
        buf = self._buf
        n = len(buf)
        while pos < n:
            i = _next_eol(buf, pos)
            if i < 0:
                break
            if buf[i] == "\r" and i + 1 == n and not final:
                break  # a CR at the end may be the first half of CRLF
            end = i + 2 if buf.startswith("\r\n", i) else i + 1
            self._line(buf[pos:i], out)
            pos = end
        rest = buf[pos:]
        if final and rest:
            self._line(rest, out)
            rest = ""
        self._buf = rest
        return out

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                out.append(SSEEvent("\n".join(self._data), self._event or "message"))
            self._data, self._event = [], ""
            return
        if line.startswith(":"):
            return  # comment / keep-alive ping
        if line.lstrip().startswith("{") and not self._data:
            out.append(SSEEvent(line.strip(), "message", bare=True))
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # id / retry / unknown fields: nothing to do for a one-shot stream


def _next_eol(s: str, start: int) -> int:
    """Index of the next CR or LF at or after ``start``, or -1."""
    lf = s.find("\n", start)
    cr = s.find("\r", start, lf if lf >= 0 else len(s))
    return cr if cr >= 0 else lf


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ logprob items to tokens


@dataclass(slots=True)
class _Item:
    """One logprob entry of a chunk, before its display text is fixed."""

    token: str | None
    bytes: bytes | None
    logprob: float | None
    top: tuple[Alternative, ...]


_BYTES_TOKEN = re.compile(r"\\x([0-9a-fA-F]{2})")


def _token_bytes(token: Any, raw: Any) -> bytes | None:
    """The token's bytes: the ``bytes`` list when given, else OpenAI's ``bytes:\\xNN`` form."""
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    if isinstance(token, str) and token.startswith("bytes:"):
        body = token[len("bytes:") :]
        if _BYTES_TOKEN.sub("", body) == "":
            return bytes(int(h, 16) for h in _BYTES_TOKEN.findall(body))
    return None


def _logprob(x: Any) -> float | None:
    """A real logprob, or None for missing values and OpenAI's -9999 'not in top-20'."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    if f != f or f <= _NOT_IN_TOP or f == float("-inf"):
        return None
    return f


def _alternative(token: Any, logprob: Any, raw_bytes: Any) -> Alternative:
    b = _token_bytes(token, raw_bytes)
    text = alt_text(b) if b is not None else str(token if token is not None else "")
    return Alternative(text=text, logprob=_logprob(logprob), bytes=b)


def _sorted_top(alts: list[Alternative], n: int) -> tuple[Alternative, ...]:
    """Most likely first (unknown logprobs last), at most ``n``."""
    alts.sort(key=lambda a: -a.logprob if a.logprob is not None else float("inf"))
    return tuple(alts[:n])


def chat_items(logprobs: Any, n_top: int) -> list[_Item]:
    """Items of a chat chunk's ``choices[0].logprobs`` (``content`` plus vLLM's ``reasoning``
    list when present)."""
    if not isinstance(logprobs, dict):
        return []
    out: list[_Item] = []
    for key in ("reasoning_content", "reasoning", "content"):
        entries = logprobs.get(key)
        if not isinstance(entries, list):
            continue
        for e in entries:
            if not isinstance(e, dict):
                continue
            tops = e.get("top_logprobs") or []
            alts = [
                _alternative(t.get("token"), t.get("logprob"), t.get("bytes"))
                for t in tops
                if isinstance(t, dict)
            ]
            out.append(
                _Item(
                    token=e.get("token") if isinstance(e.get("token"), str) else None,
                    bytes=_token_bytes(e.get("token"), e.get("bytes")),
                    logprob=_logprob(e.get("logprob")),
                    top=_sorted_top(alts, n_top),
                )
            )
    return out


def completion_items(logprobs: Any, n_top: int) -> list[_Item]:
    """Items of a legacy completion chunk's ``logprobs`` (parallel lists; top as dicts)."""
    if not isinstance(logprobs, dict):
        return []
    tokens = logprobs.get("tokens") or []
    lps = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    out: list[_Item] = []
    for i, tok in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        alts = [_alternative(t, lp, None) for t, lp in top.items()]
        out.append(
            _Item(
                token=tok if isinstance(tok, str) else None,
                bytes=_token_bytes(tok, None),
                logprob=_logprob(lps[i]) if i < len(lps) else None,
                top=_sorted_top(alts, n_top),
            )
        )
    return out


def fit_texts(texts: list[str], target: str) -> list[str]:
    """Adjust per-token texts so they join to ``target`` (the server's content for the chunk):
    texts that continue the target are kept, others become "", what is left goes to the last."""
    if "".join(texts) == target or not texts:
        return texts
    out: list[str] = []
    pos = 0
    for t in texts:
        if t and target.startswith(t, pos):
            out.append(t)
            pos += len(t)
        else:
            out.append("")
    out[-1] += target[pos:]
    return out


# Marker tokens around reasoning deltas: text only, no telemetry; compared by identity.
THINK_OPEN = TokenEvent(text="<think>")
THINK_CLOSE = TokenEvent(text="</think>")


def is_marker(ev: TokenEvent) -> bool:
    """True for the synthetic ``<think>`` / ``</think>`` tokens this backend inserts."""
    return ev is THINK_OPEN or ev is THINK_CLOSE


@dataclass
class ChunkAssembler:
    """Turns parsed stream chunks into TokenEvents; keeps the UTF-8 decoder and the
    reasoning (``<think>``) state across chunks."""

    n_top: int
    chat: bool = True
    in_reasoning: bool = False
    _dec: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def feed(self, choice: dict[str, Any]) -> list[TokenEvent]:
        """TokenEvents for one ``choices[0]`` object."""
        if self.chat:
            # A server that ignores ``stream`` answers with one whole ``message``.
            delta = choice.get("delta") or choice.get("message") or {}
            if not isinstance(delta, dict):
                delta = {}
            reasoning = delta.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = delta.get("reasoning")
            reasoning = reasoning if isinstance(reasoning, str) else None
            content = delta.get("content") if isinstance(delta.get("content"), str) else None
            items = chat_items(choice.get("logprobs"), self.n_top)
        else:
            reasoning = None
            content = choice.get("text") if isinstance(choice.get("text"), str) else None
            items = completion_items(choice.get("logprobs"), self.n_top)
        if not items:
            return self._plain(reasoning, content)
        texts = [
            self._dec.decode(it.bytes) if it.bytes is not None else (it.token or "") for it in items
        ]
        if reasoning is not None or content is not None:
            texts = fit_texts(texts, (reasoning or "") + (content or ""))
        events = [
            TokenEvent(text=t, bytes=it.bytes, logprob=it.logprob, top=it.top)
            for t, it in zip(texts, items, strict=True)
        ]
        head = [self._open()] if reasoning and not self.in_reasoning else []
        if content and self.in_reasoning:
            # Close right after the token that completes this chunk's reasoning text.
            cut, acc = 0, 0
            if reasoning:
                cut = len(events)
                for i, ev in enumerate(events):
                    acc += len(ev.text)
                    if acc >= len(reasoning):
                        cut = i + 1
                        break
            events.insert(cut, self._close())
        return head + events

    def finish(self) -> list[TokenEvent]:
        """Events still owed at the end of the stream (an unclosed ``</think>``)."""
        return [self._close()] if self.in_reasoning else []

    def _plain(self, reasoning: str | None, content: str | None) -> list[TokenEvent]:
        out: list[TokenEvent] = []
        if reasoning:
            if not self.in_reasoning:
                out.append(self._open())
            out.append(TokenEvent(text=reasoning))
        if content:
            if self.in_reasoning:
                out.append(self._close())
            out.append(TokenEvent(text=content))
        return out

    def _open(self) -> TokenEvent:
        self.in_reasoning = True
        return THINK_OPEN

    def _close(self) -> TokenEvent:
        self.in_reasoning = False
        return THINK_CLOSE


# ------------------------------------------------------------------------ HTTP plumbing


def _one_line(s: str, limit: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def error_message(payload: Any) -> str:
    """A one-line message from an error body (OpenAI ``{"error": {...}}``, FastAPI
    ``{"detail": ...}``, a bare string)."""
    if isinstance(payload, dict):
        for key in ("error", "detail", "message", "msg"):
            if key in payload:
                return error_message(payload[key])
        return _one_line(json.dumps(payload))
    if isinstance(payload, list):
        return "; ".join(error_message(p) for p in payload[:3])
    return _one_line(str(payload))


def _body_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        return error_message(json.loads(text))
    except ValueError:
        return _one_line(text) or "(empty body)"


class _Pump(threading.Thread):
    """Reads the HTTP response on its own thread and queues what happens, so the consumer can
    watch deadlines and ``cancel`` while a read blocks."""

    def __init__(self, client: Any, url: str, body: dict[str, Any], headers: dict[str, str]):
        super().__init__(name="thoughtform-openai", daemon=True)
        self.client, self.url, self.body, self.headers = client, url, body, headers
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop_flag = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            with self.client.stream("POST", self.url, json=self.body, headers=self.headers) as r:
                stream = r.extensions.get("network_stream")
                with self._lock:
                    if stream is not None:
                        self._sock = stream.get_extra_info("socket")
                    if self._stop_flag.is_set():
                        self._shutdown()
                        return
                if r.status_code >= 400:
                    body = b""
                    for part in r.iter_bytes():
                        body += part
                        if len(body) > 65536:
                            break
                    self.q.put(("status", (r.status_code, r.reason_phrase, body)))
                    return
                self.q.put(("open", r.headers.get("content-type", "")))
                for part in r.iter_bytes():
                    if self._stop_flag.is_set():
                        return
                    self.q.put(("data", part))
                with self._lock:
                    # Body complete: the connection goes back to the pool; never shut it.
                    self._sock = None
            self.q.put(("eof", None))
        except Exception as e:  # every failure reaches the consumer as one message
            if not self._stop_flag.is_set():
                self.q.put(("exc", e))

    def stop(self) -> None:
        """Close the connection now: a shutdown wakes the blocked read and tells the server."""
        with self._lock:
            self._stop_flag.set()
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self._sock.shutdown(socket.SHUT_RDWR)


def normalize_base_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; URLs with a path are kept as given."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if "/" not in url.partition("://")[2]:
        url += "/v1"
    return url


def _describe_exc(e: BaseException, base_url: str, received: int) -> str:
    import httpx

    name = type(e).__name__
    detail = _one_line(str(e)) or name
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect to {base_url}: {detail}"
    if isinstance(e, httpx.TimeoutException):
        return f"server timed out ({name}) after {received} tokens"
    if isinstance(e, httpx.RemoteProtocolError | httpx.ReadError):
        return f"connection lost after {received} tokens: {detail}"
    return f"{name}: {detail}"


_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "max_tokens": "length",
    "model_length": "length",
}


class OpenAIBackend:
    """Any OpenAI-compatible server over HTTP: chat or legacy completions with logprobs."""

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        first_token_timeout: float | None = 60.0,
        mode: Mode | None = None,
        max_alternatives: int = DEFAULT_MAX_ALTERNATIVES,
        logprobs: bool = True,
    ) -> None:
        import httpx

        if mode not in (None, "chat", "completion"):
            raise BackendError(f"openai backend: mode must be 'chat' or 'completion', not {mode!r}")
        self.base_url = normalize_base_url(
            base_url or os.environ.get("THOUGHTFORM_BASE_URL") or DEFAULT_BASE_URL
        )
        self.model: str | None = model or os.environ.get("THOUGHTFORM_MODEL") or None
        self.model_name: str = self.model or ""
        self._api_key = api_key or os.environ.get("THOUGHTFORM_API_KEY") or None
        self.timeout = float(timeout)
        self.first_token_timeout = first_token_timeout
        self.mode = mode
        self.max_alternatives = max(0, int(max_alternatives))
        self.logprobs = logprobs
        self._probed = False
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            headers={"Accept-Encoding": "identity"},  # compressed SSE would be buffered
        )

    @property
    def capabilities(self) -> Capabilities:
        """Logprobs and top-k alternatives (when the server sends them); no exact entropy."""
        return Capabilities(
            logprobs=self.logprobs,
            max_alternatives=self.max_alternatives if self.logprobs else 0,
            logit_bias=True,
            chat=self.mode != "completion",
            completion=True,
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    # -------------------------------------------------------------- request building

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "text/event-stream"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def resolve_model(self) -> str | None:
        """The model to name in requests: the configured one, else the server's first model
        from ``/models`` (asked once), else None (many local servers need none)."""
        if self.model or self._probed:
            return self.model
        self._probed = True
        try:
            r = self._client.get(
                self.base_url + "/models", headers=self._headers(), timeout=min(10.0, self.timeout)
            )
            data = r.json().get("data") if r.status_code == 200 else None
            if isinstance(data, list) and data and isinstance(data[0], dict):
                mid = data[0].get("id")
                if isinstance(mid, str) and mid:
                    self.model = self.model_name = mid
        except Exception:  # listing models is optional; the request itself will report errors
            pass
        return self.model

    def build(self, request: GenerationRequest) -> tuple[str, dict[str, Any], bool, int]:
        """URL, JSON body, whether it is a chat request, and the number of alternatives asked
        for (raises BackendError)."""
        chat = request.is_chat if self.mode is None else self.mode == "chat"
        s = request.sampling
        body: dict[str, Any] = {"stream": True, "max_tokens": s.max_tokens}
        model = self.resolve_model()
        if model:
            body["model"] = model
        if chat:
            if request.prompt is not None:
                messages = [{"role": "user", "content": request.prompt}]
            else:
                messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if not messages:
                raise BackendError("openai backend: the request has no messages")
            body["messages"] = messages
        else:
            if request.prompt is None:
                raise BackendError("openai backend: mode 'completion' needs a prompt, not messages")
            body["prompt"] = request.prompt
        body["temperature"] = s.temperature
        body["top_p"] = s.top_p
        if s.top_k > 0:  # not in OpenAI's API; vLLM and llama.cpp servers accept it
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if request.logit_bias:
            body["logit_bias"] = {str(k): float(v) for k, v in request.logit_bias.items()}
        n = min(max(0, request.alternatives), self.max_alternatives) if self.logprobs else 0
        if self.logprobs:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = n
            else:
                body["logprobs"] = n  # legacy completions: an int, the top-k count
        path = "/chat/completions" if chat else "/completions"
        return self.base_url + path, body, chat, n

    # -------------------------------------------------------------------- streaming

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Stream the reply; every fault ends it with a FinishEvent(reason="error")."""
        t0 = time.perf_counter()
        try:
            url, body, chat, n_top = self.build(request)
        except BackendError as e:
            yield FinishEvent("error", str(e))
            return
        if cancel is not None and cancel.is_set():
            yield FinishEvent("cancelled", "stopped by the user")
            return
        sent = time.perf_counter()  # the first-token clock starts when the request goes out
        run = _Run(t0, ChunkAssembler(n_top=n_top, chat=chat))
        pump = _Pump(self._client, url, body, self._headers())
        pump.start()
        clean = False
        whole = False
        buf = b""
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    pump.stop()  # before yielding: the consumer may never resume us
                    yield run.done("cancelled", "stopped by the user")
                    return
                now = time.perf_counter()
                if run.n == 0 and self.first_token_timeout is not None:
                    deadline = sent + self.first_token_timeout
                    late = f"no token within {self.first_token_timeout:g} s"
                else:
                    deadline = run.last_data + self.timeout
                    late = f"no data for {self.timeout:g} s after {run.n} tokens"
                if now >= deadline:
                    pump.stop()
                    yield run.done("error", late)
                    return
                wait = deadline - now if cancel is None else min(_POLL_S, deadline - now)
                try:
                    kind, payload = pump.q.get(timeout=wait)
                except queue.Empty:
                    continue
                if kind == "status":
                    status, phrase, raw = payload
                    msg = f"HTTP {status} {phrase}".strip() + f": {_body_message(raw)}"
                    yield run.done("error", msg)
                    return
                if kind == "exc":
                    yield run.done("error", _describe_exc(payload, self.base_url, run.n))
                    return
                if kind == "open":
                    # Plain JSON (a server that does not stream) is parsed whole at the end.
                    whole = payload.split(";")[0].strip().lower() == "application/json"
                    continue
                run.last_data = time.perf_counter()
                if whole:
                    if kind == "data":
                        buf += payload
                        continue
                    events = [SSEEvent(buf.decode("utf-8", errors="replace"))] if buf else []
                else:
                    events = run.parser.feed(payload) if kind == "data" else run.parser.close()
                for ev in events:
                    if cancel is not None and cancel.is_set():
                        break  # answered at the top of the loop
                    out = run.handle(ev)
                    yield from out.tokens
                    if out.finish is not None:
                        clean = out.finish.reason != "error"
                        if not clean:
                            pump.stop()
                        yield out.finish
                        return
                if kind == "eof" and not (cancel is not None and cancel.is_set()):
                    yield from run.eof()
                    clean = True
                    return
        except GeneratorExit:
            return
        finally:
            if not clean:
                pump.stop()


@dataclass
class _Outcome:
    tokens: list[TokenEvent]
    finish: FinishEvent | None = None


@dataclass
class _Run:
    """The state of one streamed reply: parser, assembler, counters, finish reason."""

    t0: float
    asm: ChunkAssembler
    parser: SSEParser = field(default_factory=SSEParser)
    n: int = 0
    first_at: float | None = None
    last_data: float = field(default_factory=time.perf_counter)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)

    def done(self, reason: FinishReason, message: str = "") -> FinishEvent:
        """The FinishEvent with timings and usage (the server's, else our token count)."""
        now = time.perf_counter()
        timings = {"total_s": now - self.t0}
        if self.first_at is not None:
            timings["first_token_s"] = self.first_at - self.t0
            if self.n > 1 and now > self.first_at:
                timings["tokens_per_s"] = (self.n - 1) / (now - self.first_at)
        return FinishEvent(reason, message, timings, self.usage or {"completion_tokens": self.n})

    def _count(self, tokens: list[TokenEvent]) -> list[TokenEvent]:
        for t in tokens:
            if self.first_at is None:
                self.first_at = time.perf_counter()
            if not is_marker(t):
                self.n += 1
        return tokens

    def handle(self, ev: SSEEvent) -> _Outcome:
        """Tokens for one SSE event, and the FinishEvent when it ends the stream."""
        if ev.data.strip() == "[DONE]":
            tail = self._count(self.asm.finish())
            return _Outcome(tail, self.done(*_finish_for(self.finish_reason)))
        try:
            obj = json.loads(ev.data)
        except ValueError:
            return _Outcome(
                [], self.done("error", f"server sent invalid JSON: {_one_line(ev.data, 120)}")
            )
        if ev.event == "error" or (isinstance(obj, dict) and "error" in obj):
            return _Outcome([], self.done("error", f"server error: {error_message(obj)}"))
        if not isinstance(obj, dict):
            return _Outcome([])
        if isinstance(obj.get("usage"), dict):
            self.usage = {k: v for k, v in obj["usage"].items() if isinstance(v, int)}
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return _Outcome([])
        choice = choices[0]
        tokens = self._count(self.asm.feed(choice))
        fr = choice.get("finish_reason")
        if isinstance(fr, str) and fr:
            self.finish_reason = fr
        return _Outcome(tokens)

    def eof(self) -> list[StreamEvent]:
        """The stream closed cleanly without ``[DONE]``: fine after a finish_reason, else an
        error (a server that died mid-reply)."""
        out: list[StreamEvent] = list(self._count(self.asm.finish()))
        if self.finish_reason is None:
            out.append(self.done("error", f"stream ended without [DONE] after {self.n} tokens"))
        else:
            out.append(self.done(*_finish_for(self.finish_reason)))
        return out


def _finish_for(fr: str | None) -> tuple[FinishReason, str]:
    """Map a server finish_reason to ours, with a note for the unusual ones."""
    if fr is None or fr in _FINISH:
        return _FINISH.get(fr or "stop", "stop"), ""
    if fr == "abort":  # vLLM: the request was aborted server-side
        return "error", "the server aborted the request"
    return "stop", f"finish_reason={fr}"
