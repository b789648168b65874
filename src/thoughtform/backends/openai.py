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
import dataclasses
import json
import math
import os
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..steer import SteerError, _consistent, _proper_prefix, structure_gbnf
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

if TYPE_CHECKING:
    from ..steer import Conductor

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


# ------------------------------------------------------------- servers and what they allow


class NoPrefill(BackendError):
    """The server cannot continue a partial assistant reply in chat form."""


def forced_event(text: str) -> TokenEvent:
    """Text put into the reply rather than sampled (a branch's fork, a prefilled voice marker):
    one forced token, without telemetry (the server gives none for text it did not sample)."""
    return TokenEvent(text=text, forced=True, steered=True, steered_logprob=0.0)


def load_chat_template(spec: str | None) -> str | None:
    """A chat template from ``spec``: Jinja text, a text file holding it, or a ``.gguf`` whose
    ``tokenizer.chat_template`` it is (None stays None; raises BackendError)."""
    if spec is None or "{" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BackendError(f"chat template {spec}: not a template, a file or a .gguf")
    if path.suffix.lower() == ".gguf":
        try:
            from gguf import GGUFReader

            field = GGUFReader(path).fields.get("tokenizer.chat_template")
            text = field.contents() if field is not None else None
        except (ImportError, OSError, ValueError) as e:
            raise BackendError(f"{path}: cannot read its chat template ({e})") from None
        if not isinstance(text, str) or not text:
            raise BackendError(f"{path}: the GGUF has no tokenizer.chat_template")
        return text
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BackendError(f"{path}: cannot read the chat template ({e})") from None


@dataclass(frozen=True)
class ServerFeatures:
    """What one kind of OpenAI-compatible server offers for steering (from its docs/source):
    the request field for a grammar, how a chat reply is prefilled, a tokenizer endpoint (path
    under the server root) and whether ``logit_bias`` takes token-id keys."""

    kind: str
    grammar: Literal["grammar", "structured_outputs"] | None
    chat_prefill: Literal["continue_final_message", "assistant"] | None
    tokenize: str | None
    logit_bias_ids: bool


SERVERS: dict[str, ServerFeatures] = {
    # vLLM: structured_outputs (guided_* were removed in v0.12), continue_final_message +
    # add_generation_prompt=false, POST /tokenize {"prompt"}.
    "vllm": ServerFeatures(
        "vllm", "structured_outputs", "continue_final_message", "/tokenize", True
    ),
    # llama.cpp's llama-server: GBNF `grammar`, a trailing assistant message is a prefill
    # (--prefill-assistant, on by default), POST /tokenize {"content"}.
    "llamacpp": ServerFeatures("llamacpp", "grammar", "assistant", "/tokenize", True),
    # llama-cpp-python's server: `grammar`, no chat prefill (its templates always open a new
    # assistant turn), POST /extras/tokenize {"input"}.
    "llama-cpp-python": ServerFeatures(
        "llama-cpp-python", "grammar", None, "/extras/tokenize", True
    ),
    # OpenAI and the rest (Ollama, LM Studio, TabbyAPI, ...): none of it is assumed.
    "openai": ServerFeatures("openai", None, None, None, False),
}
SERVER_CHOICES = ("auto", *SERVERS)
# /v1/models owned_by -> kind (llama-cpp-python hard-codes "me").
_OWNED_BY = {
    "vllm": "vllm",
    "llamacpp": "llamacpp",
    "me": "llama-cpp-python",
    "openai": "openai",
    "system": "openai",
    "openai-internal": "openai",
}

STEERING_FEATURES = ("next_voice", "mute", "voice_sampling", "structure", "voice_scores")
_CONTINUE = "the reply is cut at a voice marker and continued by a new request"
SERVER_STEERING: dict[str, dict[str, str]] = {
    "vllm": {
        "next_voice": "prefilled marker (completions: in the prompt; chat: continue_final_message)",
        "mute": "a muted marker is cut before it is shown and its token re-picked from the"
        " top_logprobs without it (logit_bias by token id via /tokenize without logprobs)",
        "voice_sampling": f"yes: {_CONTINUE} with the voice's temperature/top_p",
        "structure": "GBNF grammar via structured_outputs.grammar (live next/mute not applied)",
        "voice_scores": "approximate, from top_logprobs (<= --max-logprobs) at each marker",
    },
    "llamacpp": {
        "next_voice": "prefilled marker (completions: in the prompt; chat: assistant prefill)",
        "mute": "cut + re-pick from top_logprobs (logit_bias by token id via /tokenize without"
        " logprobs)",
        "voice_sampling": f"yes: {_CONTINUE} with the voice's temperature/top_p",
        "structure": "GBNF grammar via `grammar` (live next/mute not applied)",
        "voice_scores": "approximate, from top_logprobs at each marker",
    },
    "llama-cpp-python": {
        "next_voice": "completions only (prefilled prompt); chat requests: error (no prefill)",
        "mute": "cut + re-pick from top_logprobs (logit_bias by token id via /extras/tokenize"
        " without logprobs); chat requests cannot continue: the reply ends with an error",
        "voice_sampling": "completions only; chat requests: not applied (noted in the finish)",
        "structure": "GBNF grammar via `grammar` (live next/mute not applied)",
        "voice_scores": "approximate, from top_logprobs (--logits_all true) at each marker",
    },
    "openai": {
        "next_voice": "completions only, where the server has them; chat: error (no prefill)",
        "mute": "completions only: cut + re-pick from top_logprobs; chat: the reply ends with"
        " an error when a muted voice starts",
        "voice_sampling": "completions only; chat: not applied (noted in the finish)",
        "structure": "not supported: the reply ends with an error",
        "voice_scores": "approximate, from top_logprobs where the server sends them",
    },
}


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
        server: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        import httpx

        if mode not in (None, "chat", "completion"):
            raise BackendError(f"openai backend: mode must be 'chat' or 'completion', not {mode!r}")
        server = (server or os.environ.get("THOUGHTFORM_SERVER") or "auto").strip().lower()
        if server not in SERVER_CHOICES:
            raise BackendError(
                f"openai backend: server must be one of {', '.join(SERVER_CHOICES)}, not {server!r}"
            )
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
        self.server = server
        self._kind: str | None = None if server == "auto" else server
        self._probed = False
        self._models: list[dict[str, Any]] | None = None
        self._token_cache: dict[str, list[int] | None] = {}
        #: The model's chat template (Jinja): lets a chat reply be continued on a server with no
        #: assistant prefill, as a completion of the rendered chat (see :meth:`render_chat`).
        self.chat_template = load_chat_template(
            chat_template or os.environ.get("THOUGHTFORM_CHAT_TEMPLATE") or None
        )
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            headers={"Accept-Encoding": "identity"},  # compressed SSE would be buffered
        )

    @property
    def capabilities(self) -> Capabilities:
        """Logprobs and top-k alternatives (when the server sends them); no exact entropy; no
        token-level control (steering is stop-and-continue, see :attr:`steering`)."""
        feats = SERVERS.get(self._kind or "")
        return Capabilities(
            logprobs=self.logprobs,
            max_alternatives=self.max_alternatives if self.logprobs else 0,
            logit_bias=True,
            grammar=feats is not None and feats.grammar is not None,
            chat=self.mode != "completion",
            completion=True,
            token_control=False,
            voice_scores="approximate" if self.logprobs else "none",
            # A branch re-sends the reply so far as text (the server takes no token ids).
            branching=True,
            branch_prefix="text",
        )

    @property
    def steering(self) -> dict[str, str]:
        """What each steering feature does on this server (``server`` says which kind; with
        ``server="auto"`` the kind is known after the first steered request)."""
        kind = self._kind
        if kind is None:
            return {"server": "auto (detected at the first steered request)"} | {
                k: "depends on the server: "
                + "; ".join(f"{s}: {SERVER_STEERING[s][k]}" for s in SERVERS)
                for k in STEERING_FEATURES
            }
        return {"server": kind, **SERVER_STEERING[kind]}

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    # -------------------------------------------------------------- request building

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "text/event-stream"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    @property
    def _root(self) -> str:
        """The server root (llama.cpp's ``/props`` and ``/tokenize`` live outside ``/v1``)."""
        return self.base_url.removesuffix("/v1")

    def _get_json(self, url: str) -> Any:
        """GET ``url`` as JSON, or None on any failure (probes are optional)."""
        try:
            r = self._client.get(url, headers=self._headers(), timeout=min(10.0, self.timeout))
            return r.json() if r.status_code == 200 else None
        except Exception:  # a probe that fails just means "not this kind of server"
            return None

    def _post_json(self, url: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``url``, the JSON answer or None on any failure."""
        try:
            r = self._client.post(
                url, json=body, headers=self._headers(), timeout=min(10.0, self.timeout)
            )
            return r.json() if r.status_code == 200 else None
        except Exception:  # optional, like _get_json
            return None

    def _model_list(self) -> list[dict[str, Any]]:
        """``/models`` entries (asked once)."""
        if self._models is None:
            got = self._get_json(self.base_url + "/models")
            data = got.get("data") if isinstance(got, dict) else None
            self._models = (
                [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
            )
        return self._models

    def resolve_model(self) -> str | None:
        """The model to name in requests: the configured one, else the server's first model
        from ``/models`` (asked once), else None (many local servers need none)."""
        if self.model or self._probed:
            return self.model
        self._probed = True
        models = self._model_list()
        mid = models[0].get("id") if models else None
        if isinstance(mid, str) and mid:
            self.model = self.model_name = mid
        return self.model

    def server_kind(self) -> str:
        """Which server this is (``vllm``, ``llamacpp``, ``llama-cpp-python`` or ``openai`` for
        anything else): the configured kind, else detected once from ``/v1/models``
        ``owned_by``, llama.cpp's ``/props`` or llama-cpp-python's ``/extras/tokenize``."""
        if self._kind is None:
            self._kind = self._detect()
        return self._kind

    def _detect(self) -> str:
        models = self._model_list()
        owner = str(models[0].get("owned_by") or "").lower() if models else ""
        if owner in _OWNED_BY:
            return _OWNED_BY[owner]
        props = self._get_json(self._root + "/props")
        if isinstance(props, dict) and (
            "default_generation_settings" in props or "build_info" in props
        ):
            return "llamacpp"
        tok = self._post_json(self._root + "/extras/tokenize", {"input": "a"})
        if isinstance(tok, dict) and isinstance(tok.get("tokens"), list):
            return "llama-cpp-python"
        return "openai"

    def features(self) -> ServerFeatures:
        """What this server offers for steering (detects the kind on first use)."""
        return SERVERS[self.server_kind()]

    def tokenize(self, text: str) -> list[int] | None:
        """Token ids of ``text`` through the server's tokenizer endpoint (vLLM and llama.cpp
        ``/tokenize``, llama-cpp-python ``/extras/tokenize``), or None where there is none.
        A leading BOS some servers add is dropped (found by tokenizing a lone newline)."""
        if text in self._token_cache:
            return self._token_cache[text]
        path = self.features().tokenize
        ids: list[int] | None = None
        if path is not None:
            nl = self._raw_tokens(path, "\n")
            got = self._raw_tokens(path, "\n" + text)
            if nl and got and got[: len(nl)] == nl:
                ids = got[len(nl) :]
        self._token_cache[text] = ids
        return ids

    def _raw_tokens(self, path: str, text: str) -> list[int] | None:
        kind = self.server_kind()
        if kind == "llama-cpp-python":
            body: dict[str, Any] = {"input": text}
        elif kind == "llamacpp":
            body = {"content": text, "add_special": False}
        else:
            body = {"prompt": text, "add_special_tokens": False}
            if self.resolve_model():
                body["model"] = self.model
        got = self._post_json(self._root + path, body)
        toks = got.get("tokens") if isinstance(got, dict) else None
        if not isinstance(toks, list):
            return None
        out = []
        for t in toks:
            t = t.get("id") if isinstance(t, dict) else t
            if isinstance(t, bool) or not isinstance(t, int):
                return None
            out.append(t)
        return out

    def build(self, request: GenerationRequest) -> tuple[str, dict[str, Any], bool, int]:
        """URL, JSON body, whether it is a chat request, and the number of alternatives asked
        for (raises BackendError)."""
        return self.compose(request, grammar=request.grammar)

    def compose(
        self,
        request: GenerationRequest,
        reply: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        grammar: str | None = None,
        logit_bias: dict[int, float] | None = None,
        alternatives: int | None = None,
    ) -> tuple[str, dict[str, Any], bool, int]:
        """Like :meth:`build`, continuing the assistant text ``reply`` (appended to the prompt
        on completions; a prefilled assistant message on chat, where the server has one) with
        these sampling parameters, grammar and logit bias instead of the request's."""
        chat = request.is_chat if self.mode is None else self.mode == "chat"
        s = request.sampling
        body: dict[str, Any] = {
            "stream": True,
            "max_tokens": s.max_tokens if max_tokens is None else max_tokens,
        }
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
            prefill = self.features().chat_prefill if reply else None
            if reply and prefill is None:
                if self.chat_template is None:
                    raise NoPrefill(
                        f"this server ({self.server_kind()}) cannot continue a chat reply (no"
                        " assistant prefill); send a raw prompt (completions), give the model's"
                        " chat template (chat_template / THOUGHTFORM_CHAT_TEMPLATE) or use vLLM"
                        " or llama.cpp's llama-server"
                    )
                # The chat rendered with the model's template, continued on completions.
                chat = False
                body["prompt"] = self.render_chat(messages) + reply
            else:
                if reply:
                    messages.append({"role": "assistant", "content": reply})
                    if prefill == "continue_final_message":
                        body["continue_final_message"] = True
                        body["add_generation_prompt"] = False
                body["messages"] = messages
        else:
            if request.prompt is None:
                raise BackendError("openai backend: mode 'completion' needs a prompt, not messages")
            body["prompt"] = request.prompt + reply
        body["temperature"] = s.temperature if temperature is None else temperature
        body["top_p"] = s.top_p if top_p is None else top_p
        if s.top_k > 0:  # not in OpenAI's API; vLLM and llama.cpp servers accept it
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        bias = {**request.logit_bias, **(logit_bias or {})}
        if bias:
            body["logit_bias"] = {str(k): float(v) for k, v in bias.items()}
        if grammar:
            how = self.features().grammar
            if how is None:
                raise BackendError(
                    f"grammars are not supported by this server ({self.server_kind()}: no"
                    " `grammar` or `structured_outputs`)"
                )
            if how == "structured_outputs":
                body["structured_outputs"] = {"grammar": grammar}
            else:
                body["grammar"] = grammar
        want = request.alternatives if alternatives is None else alternatives
        n = min(max(0, want), self.max_alternatives) if self.logprobs else 0
        if self.logprobs:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = n
            else:
                body["logprobs"] = n  # legacy completions: an int, the top-k count
        path = "/chat/completions" if chat else "/completions"
        return self.base_url + path, body, chat, n

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """``messages`` through the chat template, ending with the assistant turn's opening
        (``add_generation_prompt``), the way servers render it (raises BackendError)."""
        if self.chat_template is None:
            raise BackendError("openai backend: no chat template to render the chat with")
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise BackendError(
                "rendering a chat template needs jinja2 (pip install jinja2)"
            ) from None

        def fail(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = fail
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
            )
        except TemplateError as e:
            raise BackendError(f"openai backend: the chat template failed: {e}") from None

    # -------------------------------------------------------------------- streaming

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Stream the reply; every fault ends it with a FinishEvent(reason="error").

        With a conductor on a voice set that has bracket voices, the reply is steered by
        stop-and-continue (see :class:`_Steer`); otherwise it is one request, streamed as is.
        A branch (``prefix_text``/``forced_text``) continues the reply so far as text: its
        forced text is emitted first as one forced token, then the server continues both.
        """
        cond = request.conductor
        if cond is not None and any(v.syntax == "bracket" for v in cond.voices.voices):
            yield from _Steer(self, request, cancel, cond).run()
            return
        t0 = time.perf_counter()
        branch = bool(request.prefix_text or request.forced_text)
        left = request.sampling.max_tokens - (1 if request.forced_text else 0)
        try:
            if branch:
                url, body, chat, n_top = self.compose(
                    request,
                    reply=request.prefix_text + request.forced_text,
                    max_tokens=max(1, left),
                    grammar=request.grammar,
                )
            else:
                url, body, chat, n_top = self.build(request)
        except BackendError as e:
            yield FinishEvent("error", str(e))
            return
        if cancel is not None and cancel.is_set():
            yield FinishEvent("cancelled", "stopped by the user")
            return
        if request.forced_text:
            yield forced_event(request.forced_text)
            if left <= 0:
                yield FinishEvent("length", usage={"completion_tokens": 1})
                return
        yield from self._events(url, body, chat, n_top, cancel, t0)

    def _events(
        self,
        url: str,
        body: dict[str, Any],
        chat: bool,
        n_top: int,
        cancel: threading.Event | None,
        t0: float,
    ) -> Generator[StreamEvent, None, None]:
        """One request, streamed: token events, then exactly one FinishEvent. Closing the
        generator early hangs up, so the server stops generating."""
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


# ------------------------------------------------------- steering by stop-and-continue

_NL_BRACKET = re.compile(r"\n[ \t]*\[")
# Characters per token assumed when a structure's block budget (tokens) becomes a grammar's
# character bound: English BPE text runs ~4 per token; 3 leaves room for the next marker.
_CHARS_PER_TOKEN = 3


def marker_start(line: str, text: str) -> int:
    """Offset in ``text`` (which follows the current line ``line``) where a bracket marker
    could open at the start of a line, or -1."""
    if line.strip(" \t") == "":
        j = len(text) - len(text.lstrip(" \t"))
        if text[j : j + 1] == "[":
            return j
    m = _NL_BRACKET.search(text)
    return m.end() - 1 if m else -1


def _first_line(s: str) -> str:
    return s.split("\n", 1)[0].lower()


def _usable(a: Alternative) -> bool:
    """An alternative whose text can be appended to a prompt: a logprob, and real text (not a
    display form such as ``<empty>`` or ``<0xE2>`` for a partial character)."""
    if a.logprob is None or not a.text:
        return False
    if a.bytes is not None:
        try:
            return a.bytes.decode("utf-8") == a.text and bool(a.bytes)
        except UnicodeDecodeError:
            return False
    return True


def sample_alternative(
    alts: list[Alternative], temperature: float, top_p: float, rng: random.Random
) -> tuple[Alternative, float] | None:
    """Sample one of ``alts`` (the allowed part of a server's top-k) at this temperature and
    top-p; returns it with its log-probability as sampled, or None when there is none."""
    alts = [a for a in alts if a.logprob is not None]
    if not alts:
        return None
    lps = [float(a.logprob) for a in alts]  # type: ignore[arg-type]
    if temperature <= 0:
        i = max(range(len(alts)), key=lambda k: lps[k])
        return alts[i], 0.0
    top = max(lps)
    w = [math.exp((lp - top) / temperature) for lp in lps]
    z = sum(w)
    order = sorted(range(len(alts)), key=lambda k: -w[k])
    keep: list[int] = []
    acc = 0.0
    for k in order:
        keep.append(k)
        acc += w[k] / z
        if acc >= top_p:
            break
    zk = sum(w[k] for k in keep)
    r = rng.random() * zk
    for k in keep:
        r -= w[k]
        if r <= 0:
            break
    return alts[k], math.log(w[k] / zk)


@dataclass
class _Hit:
    """A declared voice's marker the model just wrote, held back (not yet emitted)."""

    voice: str
    held: list[TokenEvent]
    cut: int  # offset of '[' in held[0].text
    emitted: str  # the marker's first part when it was emitted already (after a re-pick)
    line: str  # the current line before held[0]
    at: int  # reply offset where the marker starts


class _Watch:
    """Holds tokens back from the moment a line starts with ``[`` until it is known whether
    this is a declared voice's marker (a hit) or not (the tokens are released)."""

    def __init__(self, keys: list[tuple[str, str]], reply: str) -> None:
        self.keys = keys  # (lowercase opener, voice), longest first
        nl = reply.rfind("\n")
        self.line = reply[nl + 1 :]
        self.offset = len(reply)
        self.held: list[TokenEvent] = []
        self.marker: str | None = None
        self.cut = 0
        self.emitted = ""
        self.line0 = self.line
        self.at = 0
        lead = self.line.lstrip(" \t")
        if lead.startswith("[") and self._open(lead):
            # Resumed inside a marker whose first part is already out (after a re-pick).
            self.marker = self.emitted = lead
            self.at = len(reply) - len(lead)

    def _open(self, marker: str) -> bool:
        low = _first_line(marker)
        return "\n" not in marker and any(k.startswith(low) for k, _ in self.keys)

    def push(self, ev: TokenEvent) -> tuple[list[TokenEvent], _Hit | None]:
        """One token in; the tokens now safe to emit, and a hit when a marker completed."""
        if self.marker is None:
            k = marker_start(self.line, ev.text)
            if k < 0:
                self._advance(ev.text)
                return [ev], None
            self.held, self.cut, self.marker = [ev], k, ev.text[k:]
            self.line0, self.at = self.line, self.offset + k
        else:
            self.held.append(ev)
            self.marker += ev.text
        low = _first_line(self.marker)
        for key, voice in self.keys:
            if low.startswith(key):
                if low[len(key) :].startswith("("):
                    break  # [Name](url): a Markdown link, not a marker
                return [], _Hit(voice, self.held, self.cut, self.emitted, self.line0, self.at)
        else:
            if self._open(self.marker):
                return [], None
        return self.release(), None

    def release(self) -> list[TokenEvent]:
        """Give back everything held (the stream ended, or it was no marker after all)."""
        out = self.held
        for ev in out:
            self._advance(ev.text)
        self.held, self.marker, self.emitted = [], None, ""
        return out

    def _advance(self, text: str) -> None:
        self.offset += len(text)
        nl = text.rfind("\n")
        self.line = text[nl + 1 :] if nl >= 0 else self.line + text


class _Steer:
    """One reply steered on a server without token-level control (stop-and-continue).

    The reply streams as usual, except that a line starting with ``[`` is held back until its
    marker is known. At a declared voice's marker (a voice boundary) the conductor is asked:

    * a pending **next voice** other than the model's: the held marker is dropped, the wanted
      one emitted as a forced token, and a new request continues from the reply so far (in the
      prompt on completions, as a prefilled assistant message on chat where the server has one);
    * a **muted** voice: its marker is dropped at its first token that spells only a muted
      marker; that token is re-picked from the server's top-k without muted markers (at the
      request's temperature and top-p; a one-token request with ``logit_bias`` by token id when
      there are no logprobs but a tokenizer endpoint; else another voice is forced);
    * **per-voice sampling**: a voice whose temperature / top-p differ from the running
      request's gets a new request after its marker;
    * **who speaks next**: the probabilities of each voice's marker from the top-k of the held
      tokens (approximate: only the top-k, along the path the model took), recorded through
      :meth:`Conductor.record_choice`.

    A structure is one grammar request (``structure_gbnf``); live changes then wait for the
    next reply. The reply start is a boundary too: a next voice is prefilled there.
    """

    def __init__(
        self,
        backend: OpenAIBackend,
        request: GenerationRequest,
        cancel: threading.Event | None,
        cond: Conductor,
    ) -> None:
        self.b, self.req, self.cancel, self.cond = backend, request, cancel, cond
        self.t0 = time.perf_counter()
        self.first_at: float | None = None
        self.reply = ""
        self.n = 0  # tokens emitted (think markers excluded)
        self.requests = 0
        self.prompt_tokens: int | None = None
        self.voice = cond.voice
        s = request.sampling
        self.base = (s.temperature, s.top_p)
        self.sampling = self.base  # of the running request
        self.grammar = False
        self.chat = request.is_chat if backend.mode is None else backend.mode == "chat"
        keys = [
            (f"[{k.lower()}]", v.name)
            for v in cond.voices.voices
            if v.syntax == "bracket"
            for k in (v.name, *v.aliases)
        ]
        self.keys = sorted(keys, key=lambda kv: -len(kv[0]))
        self.notes: list[str] = []
        self.scored_at = -1

    # -- plumbing ----------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _can_continue(self) -> bool:
        """Whether a partial reply can be continued by a new request."""
        return (
            not self.chat
            or self.b.features().chat_prefill is not None
            or self.b.chat_template is not None
        )

    def _emit(self, ev: TokenEvent, sampled: bool = True) -> TokenEvent:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if sampled and not is_marker(ev) and not ev.steered:
            if self.grammar or self.sampling != self.base:
                ev = dataclasses.replace(ev, steered=True)
        self.reply += ev.text
        if not is_marker(ev):
            self.n += 1
        return ev

    def _finish(self, reason: FinishReason, message: str = "") -> FinishEvent:
        now = time.perf_counter()
        timings = {"total_s": now - self.t0}
        if self.first_at is not None:
            timings["first_token_s"] = self.first_at - self.t0
            if self.n > 1 and now > self.first_at:
                timings["tokens_per_s"] = (self.n - 1) / (now - self.first_at)
        usage = {"completion_tokens": self.n, "requests": self.requests}
        if self.prompt_tokens is not None:
            usage["prompt_tokens"] = self.prompt_tokens
        msg = "; ".join(x for x in (message, *self.notes) if x)
        return FinishEvent(reason, msg, timings, usage)

    def _open(self, **kw: Any) -> Generator[StreamEvent, None, None]:
        """One request continuing the reply so far (raises BackendError)."""
        url, body, chat, n_top = self.b.compose(self.req, reply=self.reply, **kw)
        self.requests += 1
        return self.b._events(url, body, chat, n_top, self.cancel, time.perf_counter())

    def _first_token(self, reply: str, **kw: Any) -> TokenEvent | None:
        """The first token of a one-token request continuing ``reply`` (None on any fault)."""
        try:
            url, body, chat, n_top = self.b.compose(self.req, reply=reply, max_tokens=1, **kw)
        except BackendError:
            return None
        self.requests += 1
        sub = self.b._events(url, body, chat, n_top, self.cancel, time.perf_counter())
        try:
            for ev in sub:
                return ev if isinstance(ev, TokenEvent) else None
        finally:
            sub.close()
        return None

    def _forced(self, name: str) -> TokenEvent:
        v = self.cond.voices.voice(name)
        self.voice = v.name
        return forced_event(v.open_marker + "\n")

    def _pre(self, hit: _Hit) -> list[TokenEvent]:
        """The part of the first held token before the marker (e.g. the line feed of ``\\n[``)."""
        if hit.emitted or hit.cut == 0:
            return []
        h0 = hit.held[0]
        return [dataclasses.replace(h0, text=h0.text[: hit.cut], bytes=None, steered=True)]

    # -- the reply ---------------------------------------------------------------------------

    def run(self) -> Iterator[StreamEvent]:
        """The steered reply: token events, then one FinishEvent."""
        cond = self.cond
        try:
            if cond.structure is not None:
                yield from self._structured()
                return
            if self.req.prefix_text or self.req.forced_text:
                # A branch: the reply so far is the parent's, then the fork's forced text.
                if not self._can_continue():
                    yield self._finish(
                        "error",
                        f"branch: this server ({self.b.server_kind()}) cannot continue a chat"
                        " reply; send a raw prompt (completions), give the model's chat"
                        " template or use vLLM or llama.cpp's llama-server",
                    )
                    return
                self.reply = self.req.prefix_text
                if self.req.forced_text:
                    yield self._emit(forced_event(self.req.forced_text), sampled=False)
                    # The conductor has read it by now: a forced marker opened its voice.
                    self.voice = cond.voice
            nv = cond.next_voice
            if nv is not None and nv not in cond.muted:
                if not self._can_continue():
                    yield self._finish(
                        "error",
                        f"next voice {nv}: this server ({self.b.server_kind()}) cannot prefill"
                        " a chat reply; send a raw prompt (completions) or use vLLM or"
                        " llama.cpp's llama-server",
                    )
                    return
                cond.set_next_voice(None)
                probs = self._probe() if cond.plan.score_voices else None
                if probs is not None:
                    cond.record_choice(probs, forced=True)
                    self.scored_at = 0
                yield self._emit(self._forced(nv), sampled=False)
            yield from self._loop()
        except BackendError as e:
            yield self._finish("error", str(e))

    def _loop(self) -> Iterator[StreamEvent]:
        cond = self.cond
        while True:
            if self.cancel is not None and self.cancel.is_set():
                yield self._finish("cancelled", "stopped by the user")
                return
            left = self.req.sampling.max_tokens - self.n
            if left <= 0:
                yield self._finish("length")
                return
            t, p = cond.sampling_for(self.voice)
            sub = self._open(temperature=t, top_p=p, max_tokens=left)
            self.sampling = (t, p)
            watch = _Watch(self.keys, self.reply)
            try:
                for ev in sub:
                    if isinstance(ev, FinishEvent):
                        for h in watch.release():
                            yield self._emit(h)
                        if self.prompt_tokens is None and "prompt_tokens" in ev.usage:
                            self.prompt_tokens = ev.usage["prompt_tokens"]
                        yield self._finish(ev.reason, ev.message)
                        return
                    ready, hit = watch.push(ev)
                    for r in ready:
                        yield self._emit(r)
                    if hit is None:
                        continue
                    events, verdict = self._boundary(hit)
                    if verdict != "continue":
                        # Hang up before anything else: the server stops at its next write,
                        # and a one-slot server would queue the next request behind this one.
                        sub.close()
                    if verdict == "repick":
                        events, verdict = self._repick(hit)
                    for out in events:
                        yield self._emit(out, sampled=not out.forced and not out.steered)
                    if verdict == "continue":
                        watch.release()  # emitted above
                        continue
                    if verdict != "cut":
                        yield self._finish(*verdict.split(":", 1))  # type: ignore[arg-type]
                        return
                    break  # continue with a new request
            finally:
                sub.close()

    def _boundary(self, hit: _Hit) -> tuple[list[TokenEvent], str]:
        """Apply the conductor at a voice marker: the events to emit and what next ("continue"
        this stream, "cut" it and continue with a new request, "repick" the muted marker's
        token once the stream is closed, or "REASON:message" to end the reply)."""
        cond = self.cond
        probs: dict[str, float] | None = None
        if cond.plan.score_voices and hit.at != self.scored_at:
            probs = self._hit_probs(hit)
        self.scored_at = hit.at
        v = hit.voice
        nv = cond.next_voice
        if nv is not None and nv not in cond.muted and nv != v and not hit.emitted:
            cond.set_next_voice(None)
            if self._can_continue():
                if probs is not None:
                    cond.record_choice(probs, forced=True)
                return [*self._pre(hit), self._forced(nv)], "cut"
            self._note(f"next voice {nv} not applied: this server cannot continue a chat reply")
        elif nv == v:
            cond.set_next_voice(None)
        if v in cond.muted:
            if probs is not None:
                cond.record_choice(probs, forced=False)
            if not self._can_continue():
                return self._pre(hit), (
                    f"error:muted voice {v} started and this server ({self.b.server_kind()})"
                    " cannot continue a chat reply without it; send a raw prompt (completions)"
                )
            return [], "repick"
        if probs is not None:
            cond.record_choice(probs, forced=False)
        self.voice = v
        if cond.sampling_for(v) != self.sampling:
            if self._can_continue():
                return list(hit.held), "cut"
            self._note("per-voice sampling not applied: this server cannot continue a chat reply")
        return list(hit.held), "continue"

    # -- mute ----------------------------------------------------------------------------------

    def _banned(self, marker: str) -> bool:
        """Whether marker text (from its '[') could only spell a muted voice's marker."""
        muted = self.cond.muted
        low = _first_line(marker)
        return _consistent(low, [k for k, v in self.keys if v in muted]) and not _proper_prefix(
            low, [k for k, v in self.keys if v not in muted]
        )

    def _alt_ok(self, hit: _Hit, pos: int, state: str, text: str) -> bool:
        if pos == 0 and not hit.emitted:
            k = marker_start(hit.line, text)
            return k < 0 or not self._banned(text[k:])
        return not self._banned(state + text)

    def _repick(self, hit: _Hit) -> tuple[list[TokenEvent], str]:
        """Replace the first held token that spells only a muted marker."""
        state = hit.emitted
        pos = len(hit.held) - 1
        for i, ev in enumerate(hit.held):
            piece = ev.text[hit.cut :] if i == 0 and not hit.emitted else ev.text
            if self._banned(state + piece):
                pos = i
                break
            state += piece
        head = hit.held[:pos]
        at = hit.held[pos]
        t, p = self.sampling  # the marker was sampled under the running request
        cands = [a for a in at.top if _usable(a) and self._alt_ok(hit, pos, state, a.text)]
        got = sample_alternative(cands, t, p, self.cond.rng)
        if got is not None:
            alt, slp = got
            pick = TokenEvent(
                text=alt.text,
                bytes=alt.bytes,
                logprob=alt.logprob,
                top=at.top,
                steered=True,
                steered_logprob=slp,
            )
            return [*head, pick], "cut"
        tok = self._bias_step(hit, head, pos, state)
        if tok is not None:
            return [*head, tok], "cut"
        return self._other_voice(hit)

    def _bias_step(
        self, hit: _Hit, head: list[TokenEvent], pos: int, state: str
    ) -> TokenEvent | None:
        """One token from the server with the muted markers' tokens banned by ``logit_bias``
        (token-id keys, from its tokenizer endpoint); None where that is not possible. The ban
        holds for this one position only: a request-wide bias would also ban the name in prose
        (string keys on llama.cpp ban every token of the string, '[' included)."""
        feats = self.b.features()
        if not feats.logit_bias_ids or feats.tokenize is None:
            return None
        muted: set[int] = set()
        allowed: set[int] = set()
        for v in self.cond.voices.voices:
            if v.syntax != "bracket":
                continue
            for name in (v.name, *v.aliases):
                ids = self.b.tokenize(f"[{name}]") or []
                (muted if v.name in self.cond.muted else allowed).update(ids)
        ban = muted - allowed
        if not ban:
            return None
        t, p = self.sampling
        ctx = self.reply + "".join(h.text for h in head)
        if pos == 0 and not hit.emitted:
            ctx = self.reply  # the whole first token is re-drawn
        tok = self._first_token(
            ctx, temperature=t, top_p=p, logit_bias={i: -100.0 for i in sorted(ban)}
        )
        if tok is None or not tok.text or not self._alt_ok(hit, pos, state, tok.text):
            return None
        return dataclasses.replace(tok, steered=True)

    def _other_voice(self, hit: _Hit) -> tuple[list[TokenEvent], str]:
        """Last resort (no logprobs, no tokenizer): another voice's marker, forced."""
        cond = self.cond
        ok = [
            v.name
            for v in cond.voices.voices
            if v.syntax == "bracket" and v.name not in cond.muted and v.name != self.voice
        ]
        if not ok:
            self._note("every voice is muted: the reply ends where one would begin")
            return self._pre(hit), "stop:"
        self._note("a muted voice's marker was replaced by another voice (no logprobs to re-pick)")
        return [*self._pre(hit), self._forced(cond.rng.choice(ok))], "cut"

    # -- who speaks next -----------------------------------------------------------------------

    def _walk(self, path: list[TokenEvent], line: str, emitted: str) -> dict[str, float] | None:
        """Each declared voice's probability of opening here, from the top-k of the tokens
        along ``path`` (the tokens that spelled the marker): an alternative that can only
        begin one voice's marker counts for it; one shared by several (``[``) is followed
        only along the path, with the next token's top-k."""
        if not path or not path[0].top:
            return None
        probs = {v.name: 0.0 for v in self.cond.voices.voices}

        def walk(i: int, state: str | None, w: float) -> None:
            if i >= len(path):
                return
            for a in path[i].top:
                if a.logprob is None:
                    continue
                pa = w * math.exp(a.logprob)
                if state is None:
                    k = marker_start(line, a.text)
                    if k < 0:
                        continue
                    s = a.text[k:]
                else:
                    s = state + a.text
                low = _first_line(s)
                done = [v for key, v in self.keys if low.startswith(key)]
                if done:
                    probs[done[0]] += pa
                    continue
                cons = {v for key, v in self.keys if key.startswith(low)}
                if len(cons) == 1 and "\n" not in s:
                    probs[cons.pop()] += pa
                elif cons and a.text == path[i].text and "\n" not in s:
                    walk(i + 1, s, pa)

        walk(0, emitted or None, 1.0)
        return probs

    def _hit_probs(self, hit: _Hit) -> dict[str, float] | None:
        if hit.emitted:
            return None
        return self._walk(hit.held, hit.line, "")

    def _probe(self) -> dict[str, float] | None:
        """Who would speak at the reply start (before a prefilled voice): one-token requests
        for the first token, and for the next one after the likeliest shared prefix."""
        # As many alternatives as the server gives: the voices' mass is spread over them.
        n = self.b.max_alternatives
        first = self._first_token("", temperature=0.0, alternatives=n)
        if first is None or not first.top:
            return None
        shared = None
        for a in first.top:  # most likely first
            k = marker_start("", a.text)
            if k < 0 or a.logprob is None:
                continue
            low = _first_line(a.text[k:])
            if len({v for key, v in self.keys if key.startswith(low)}) > 1:
                shared = a
                break
        path = [first]
        if shared is not None:
            nxt = self._first_token(shared.text, temperature=0.0, alternatives=n)
            path = [dataclasses.replace(first, text=shared.text)]
            if nxt is not None:
                path.append(nxt)
        return self._walk(path, "", "")

    # -- structure -----------------------------------------------------------------------------

    def _structured(self) -> Iterator[StreamEvent]:
        """One grammar request: the structure as GBNF, the next voice as its first voice."""
        cond = self.cond
        st = cond.structure
        assert st is not None
        feats = self.b.features()
        if feats.grammar is None:
            yield self._finish(
                "error",
                f"structure is not supported by this server ({feats.kind}: it takes no grammar;"
                " llama.cpp's and llama-cpp-python's servers take `grammar`, vLLM"
                " `structured_outputs`)",
            )
            return
        forced = False
        nv = cond.next_voice
        if nv is not None and nv not in cond.muted:
            st = dataclasses.replace(
                st, first=nv, never_first=tuple(x for x in st.never_first if x != nv)
            )
            cond.set_next_voice(None)
            forced = True
        max_tokens = self.req.sampling.max_tokens
        try:
            gbnf = structure_gbnf(
                cond.voices,
                st,
                cond.muted,
                block_chars=_CHARS_PER_TOKEN * st.block_budget(max_tokens),
            )
        except SteerError as e:
            yield self._finish("error", str(e))
            return
        if any(
            cond.sampling_for(v.name) != self.base
            for v in cond.voices.voices
            if v.syntax == "bracket"
        ):
            self._note("per-voice sampling is not applied under a structure on this backend")
        self.grammar = True
        sub = self._open(grammar=gbnf, max_tokens=max_tokens)
        watch = _Watch(self.keys, self.reply)
        try:
            for ev in sub:
                if isinstance(ev, FinishEvent):
                    for h in watch.release():
                        yield self._emit(h)
                    if "prompt_tokens" in ev.usage:
                        self.prompt_tokens = ev.usage["prompt_tokens"]
                    yield self._finish(ev.reason, ev.message)
                    return
                ready, hit = watch.push(ev)
                for r in ready:
                    yield self._emit(r)
                if hit is not None:
                    if cond.plan.score_voices:
                        probs = self._hit_probs(hit)
                        if probs is not None:
                            cond.record_choice(probs, forced=forced)
                    forced = False
                    for h in watch.release():
                        yield self._emit(h)
        finally:
            sub.close()
