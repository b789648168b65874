"""The proxy's ASGI app (Starlette): ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``.

Each reply is one :class:`~thoughtform.generate.Generation` consumed on its own thread (backends
block); the thread shapes and encodes the chunks and hands them to the event loop, which sends
whatever is ready in one write. A disconnect listener runs beside every reply: a client that
goes away sets the Generation's cancel event, which stops the backend (llama.cpp at the next
token, the ``openai`` backend by shutting the upstream socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..backends import Backend, BackendError, create_backend
from ..backends.base import FinishEvent
from ..generate import Generation
from ..trace import TokenRecord
from ..ui.stream import status_of
from ..voices import VoiceSet, VoiceSetError, resolve_voice_set
from . import api
from .api import ApiError, ApiRequest, Piece, Shaper
from .config import ProxyConfig, ProxyConfigError, config_from_env
from .record import Exchange, Recorder

_END = object()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return b"data: " + _dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def error_response(e: ApiError) -> JSONResponse:
    """An ApiError as OpenAI sends errors (401s also name the scheme)."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def make_backend(config: ProxyConfig) -> Backend:
    """The upstream: llama.cpp in process, or an OpenAI-compatible server via ``openai``."""
    if config.embedded:
        return create_backend("llamacpp", model=config.llama_model())
    return create_backend(
        "openai",
        base_url=config.upstream,
        model=config.model,
        api_key=config.upstream_key,
        timeout=config.upstream_timeout,
    )


def reasoning_voices(voices: VoiceSet, names: tuple[str, ...]) -> tuple[str, ...]:
    """``--reasoning-voices`` spelled as declared (unknown names refused)."""
    out = []
    for n in names:
        v = voices.get(n)
        if v is None:
            known = ", ".join(voices.names()) or "none"
            raise ProxyConfigError(f"--reasoning-voices: unknown voice {n!r} (declared: {known})")
        out.append(v.name)
    return tuple(out)


class ProxyService:
    """What every request shares: the config, voices, backend, recorder and the limits."""

    def __init__(
        self, config: ProxyConfig, backend: Backend | None = None, recorder: Recorder | None = None
    ) -> None:
        self.config = config
        try:
            self.voices = resolve_voice_set(config.voices)
        except VoiceSetError as e:
            raise ProxyConfigError(str(e)) from None
        self.reasoning = reasoning_voices(self.voices, config.reasoning_voices)
        self.system_prompt = ""
        if config.voice_prompt:
            from ..prompting import voice_system_prompt

            self.system_prompt = voice_system_prompt(self.voices)
        if backend is None:
            try:
                backend = make_backend(config)
            except BackendError as e:
                raise ProxyConfigError(f"--upstream {config.upstream}: {e}") from None
        self.backend = backend
        self.caps = backend.capabilities
        self.recorder = recorder
        if recorder is None and config.record:
            from ..ui.store import StoreError

            try:
                self.recorder = Recorder(config.db_path())
            except StoreError as e:
                backend.close()
                raise ProxyConfigError(f"--db: {e}") from None
        # A model in this process generates one reply at a time: the rest wait here, where a
        # client that leaves is noticed, rather than on the backend's lock in a thread.
        self.slots = asyncio.Semaphore(1 if self.caps.token_control else config.max_concurrent)
        self.in_flight = 0
        self.cancels: set[threading.Event] = set()
        self._model_name: str | None = None

    @property
    def model_name(self) -> str:
        """The model clients see: the backend's name, or the upstream server's model."""
        if self._model_name is None:
            name = getattr(self.backend, "model_name", "") or self.config.model
            resolve = getattr(self.backend, "resolve_model", None)
            if not name and resolve is not None:
                name = resolve()
            self._model_name = str(name or "thoughtform")
        return self._model_name

    def close(self) -> None:
        """Stop replies, write what is queued, release the backend."""
        for c in list(self.cancels):
            c.set()
        if self.recorder is not None:
            self.recorder.close()
        self.backend.close()

    # -- HTTP helpers ------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        """Raise a 401 unless the request carries the right bearer key (when one is set)."""
        key = self.config.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8"), key.encode("utf-8")
        ):
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                param=None,
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> Any:
        """The request body as JSON, at most ``max_body`` bytes (413 beyond)."""
        cap = self.config.max_body
        too_big = ApiError(
            413, f"request body larger than {cap} bytes", code="request_too_large", param=None
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            await _drain(request, 4 * cap)
            raise too_big
        parts: list[bytes] = []
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > cap:
                await _drain(request, 4 * cap - n)
                raise too_big
            parts.append(chunk)
        try:
            return json.loads(b"".join(parts))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    # -- replies -----------------------------------------------------------------------------

    def reply(self, request: Request, req: ApiRequest, endpoint: str) -> Reply:
        """The ASGI response that generates, streams (or collects) and records one reply."""
        if self.in_flight >= self.config.max_concurrent:
            raise ApiError(
                503, "the proxy is at its concurrency limit; retry", "server_error", code="busy"
            )
        return Reply(self, req, endpoint, request.client.host if request.client else None)


async def _drain(request: Request, limit: int) -> None:
    """Read and drop the rest of an oversized body (up to ``limit`` bytes), so the client gets
    the 413 instead of a reset connection while it is still sending."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                break


class Reply:
    """One request's reply as an ASGI app: waits for a slot, runs the Generation on a thread,
    sends chunks (or one JSON body), and stops the upstream if the client disconnects."""

    def __init__(self, svc: ProxyService, req: ApiRequest, endpoint: str, client: str | None):
        self.svc = svc
        self.req = req
        self.endpoint = endpoint
        self.client = client
        self.cancel = threading.Event()
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + secrets.token_urlsafe(18)
        self.created = int(time.time())
        self.model = ""  # set on the generation thread (naming it may ask the upstream)
        self.shaper = Shaper(svc.voices, svc.reasoning, svc.config.strip_markers)
        self.offsets = api.CompletionOffsets()
        self.exchange: Exchange | None = None
        self.sent_any = False
        self.tokens = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc = self.svc
        svc.in_flight += 1
        svc.cancels.add(self.cancel)
        main = asyncio.ensure_future(self._run(send))
        listener = asyncio.ensure_future(_until_disconnect(receive))
        try:
            done, _ = await asyncio.wait({main, listener}, return_when=asyncio.FIRST_COMPLETED)
            if main not in done:
                # The client left: stop the upstream now; the partial reply is recorded.
                self.cancel.set()
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await main
            else:
                main.result()
        finally:
            listener.cancel()
            if not main.done():
                main.cancel()
            self.cancel.set()  # a no-op after a normal end; stops the thread otherwise
            svc.in_flight -= 1
            svc.cancels.discard(self.cancel)

    async def _run(self, send: Send) -> None:
        async with self.svc.slots:
            items = self._start()
            first = await anext(items, None)
            if first is None:
                first = ApiError(500, "the reply ended without a result", "server_error")
            if isinstance(first, ApiError):
                await _send_json(send, first.status, first.body())
                return
            if isinstance(first, dict):
                await _send_json(send, 200, first)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for data in items:
                if isinstance(data, ApiError):
                    data = sse(data.body())
                if isinstance(data, bytes):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _start(self) -> AsyncIterator[Any]:
        """Start the generation thread; iterate what it makes (bytes of chunks, whatever is
        ready joined into one write; or the one reply body, or an ApiError)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()

        def put(x: Any) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, x)
            except RuntimeError:  # the loop is gone (server shutting down)
                self.cancel.set()

        threading.Thread(target=self._work, args=(put,), name="tf-proxy-reply", daemon=True).start()

        async def items() -> AsyncIterator[Any]:
            x = await q.get()
            while x is not _END:
                if not isinstance(x, bytes):
                    yield x
                    x = await q.get()
                    continue
                parts = [x]
                x = None
                while not q.empty():
                    y = q.get_nowait()
                    if not isinstance(y, bytes):
                        x = y
                        break
                    parts.append(y)
                yield b"".join(parts)
                if x is None:
                    x = await q.get()

        return items()

    # -- the generation thread ---------------------------------------------------------------

    def _work(self, put: Callable[[Any], None]) -> None:
        gen: Generation | None = None
        finish: FinishEvent | None = None
        collected: list[Piece] = []
        try:
            svc = self.svc
            req = self.req
            self.model = svc.model_name  # may ask the upstream once: not on the event loop
            gen = Generation(
                svc.backend,
                req.request,
                svc.voices,
                cancel=self.cancel,
                steer=req.steer,
                meta={"source": "proxy", "endpoint": self.endpoint},
            )
            self._begin_record()
            rec = svc.recorder
            for upd in gen:
                if rec is not None and self.exchange is not None and upd.resolved:
                    rec.tokens(self.exchange, upd.resolved)
                if upd.token is not None:
                    self.tokens += 1
                pieces = self.shaper.feed(upd)
                if upd.finish is not None:
                    finish = upd.finish
                    tail = self.shaper.leftover()
                    if tail is not None:
                        pieces.append(tail)
                if req.stream:
                    if pieces:
                        put(self._chunks(pieces))
                else:
                    collected += pieces
        except BaseException as e:  # never lose the end of the stream
            finish = FinishEvent("error", f"{type(e).__name__}: {e}")
            print(f"thoughtform proxy: reply failed: {finish.message}", file=sys.stderr)
        finally:
            try:
                put(self._close(gen, finish, collected))
            except BaseException as e:
                print(f"thoughtform proxy: ending a reply failed: {e}", file=sys.stderr)
                put(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))
            finally:
                put(_END)

    def _begin_record(self) -> None:
        svc, req = self.svc, self.req
        if svc.recorder is None:
            return
        s = req.request.sampling
        cfg = svc.config
        settings = {
            "backend": "llamacpp" if cfg.embedded else "openai",
            "model": (cfg.llama_model() or "") if cfg.embedded else self.model,
            "base_url": "" if cfg.embedded else cfg.upstream,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "max_tokens": s.max_tokens,
            "seed": s.seed,
            "alternatives": req.request.alternatives,
            "voice_prompt": False,
            "system": "",
        }
        meta: dict[str, Any] = {
            "backend": settings["backend"],
            "model": self.model,
            "endpoint": self.endpoint,
            "client": self.client,
            "stream": req.stream,
            "client_model": req.model,
        }
        if req.steer is not None:
            meta["steer"] = req.steer.to_dict()
        self.exchange = svc.recorder.begin(
            req.messages, svc.voices.to_dict(), settings, meta, owner=cfg.owner
        )

    def _close(
        self, gen: Generation | None, finish: FinishEvent | None, collected: list[Piece]
    ) -> Any:
        """Record how the reply ended and make the last item for the client."""
        if finish is None:
            finish = FinishEvent("error", "the reply ended unexpectedly")
        segments: list[Any] = []
        fin: dict[str, Any] = {"reason": finish.reason, "message": finish.message}
        if gen is not None:
            segments = gen.trace.segments
            fin = gen.trace.finish or fin
            if gen.trace.finish and gen.trace.finish.get("reason") != finish.reason:
                fin = {**gen.trace.finish, "reason": finish.reason, "message": finish.message}
            rec = self.svc.recorder
            if rec is not None and self.exchange is not None:
                rec.finish(self.exchange, status_of(finish.reason), fin, gen.trace.text)
        return self._end(finish.reason, finish.message, segments, fin, collected)

    def _end(
        self,
        reason: str,
        message: str,
        segments: list[Any],
        fin: dict[str, Any],
        collected: list[Piece],
    ) -> Any:
        """The last item: final chunk(s) and ``[DONE]``, the whole reply, or an error."""
        if reason not in api.FINISH:
            msg = message or "the upstream stopped"
            if reason == "cancelled":
                msg = "the reply was cancelled"
            err = ApiError(502, f"upstream error: {msg}", "server_error", code="upstream_error")
            if not self.req.stream or not self.sent_any:
                return err
            return sse(err.body())
        info: dict[str, Any] = {"segments": api.segments_payload(segments), "finish": reason}
        if self.exchange is not None:
            self.exchange.started.wait(2.0)  # the id exists once the writer created the session
            if self.exchange.sid:
                info["session"] = self.exchange.sid
        use = api.usage(fin.get("usage") or {}, self.tokens)
        if not self.req.stream:
            return self._whole(reason, info, collected, use)
        out = b"" if self.sent_any else self._head()
        if self.req.chat:
            delta: dict[str, Any] = {"thoughtform": info}
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": api.FINISH[reason],
            }
            out += sse(self._envelope([choice]))
        else:
            choice = {
                "index": 0,
                "text": "",
                "logprobs": None,
                "finish_reason": api.FINISH[reason],
                "thoughtform": info,
            }
            out += sse(self._envelope([choice]))
        if self.req.include_usage:
            out += sse({**self._envelope([]), "usage": use})
        return out + DONE

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.req.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _head(self) -> bytes:
        """The first chunk of a chat stream: the role, as OpenAI sends it."""
        self.sent_any = True
        if not self.req.chat:
            return b""
        delta = {"role": "assistant", "content": ""}
        return sse(
            self._envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        )

    def _logprobs(self, tokens: list[TokenRecord]) -> dict[str, Any] | None:
        n = self.req.logprobs
        if n is None or not tokens:
            return None
        if self.req.chat:
            return api.chat_logprobs(tokens, n)
        return self.offsets.logprobs(tokens, n)

    def _chunks(self, pieces: list[Piece]) -> bytes:
        out = b"" if self.sent_any else self._head()
        for p in pieces:
            tf = {"voice": p.voice, "segment": p.segment}
            if self.req.chat:
                delta: dict[str, Any] = {}
                if p.content or not p.reasoning:
                    delta["content"] = p.content
                if p.reasoning:
                    delta["reasoning"] = delta["reasoning_content"] = p.reasoning
                delta["thoughtform"] = tf
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": self._logprobs(p.tokens),
                    "finish_reason": None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": p.content,
                    "logprobs": self._logprobs(p.tokens),
                    "finish_reason": None,
                    "thoughtform": tf,
                }
                if p.reasoning:
                    choice["reasoning"] = choice["reasoning_content"] = p.reasoning
            out += sse(self._envelope([choice]))
        return out

    def _whole(
        self, reason: str, info: dict[str, Any], pieces: list[Piece], use: dict[str, int]
    ) -> dict[str, Any]:
        content = "".join(p.content for p in pieces)
        reasoning = "".join(p.reasoning for p in pieces)
        tokens = [t for p in pieces for t in p.tokens]
        lp = self._logprobs(tokens)
        if self.req.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning"] = message["reasoning_content"] = reasoning
            message["thoughtform"] = info
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": lp,
                "finish_reason": api.FINISH[reason],
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": content,
                "logprobs": lp,
                "finish_reason": api.FINISH[reason],
                "thoughtform": info,
            }
            if reasoning:
                choice["reasoning"] = choice["reasoning_content"] = reasoning
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": use,
        }


async def _until_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            return


async def _send_json(send: Send, status: int, obj: Any) -> None:
    body = _dumps(obj)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ------------------------------------------------------------------------------- the app


def create_app(
    config: ProxyConfig, backend: Backend | None = None, recorder: Recorder | None = None
) -> Starlette:
    """The proxy app (loads the model or connects the upstream backend now)."""
    svc = ProxyService(config, backend, recorder)

    def guarded(
        handler: Callable[[Request], Awaitable[Any]],
    ) -> Callable[[Request], Awaitable[Any]]:
        async def run(request: Request) -> Any:
            try:
                svc.check_key(request)
                return await handler(request)
            except ApiError as e:
                return error_response(e)

        return run

    async def chat(request: Request) -> Any:
        body = await svc.read_json(request)
        req = api.parse_chat(
            body,
            svc.voices,
            svc.config.max_tokens,
            svc.config.alternatives,
            svc.system_prompt,
        )
        return svc.reply(request, req, "/v1/chat/completions")

    async def completions(request: Request) -> Any:
        body = await svc.read_json(request)
        req = api.parse_completion(body, svc.voices, svc.config.max_tokens, svc.config.alternatives)
        return svc.reply(request, req, "/v1/completions")

    async def models(request: Request) -> Any:
        name = await asyncio.to_thread(lambda: svc.model_name)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "thoughtform"}],
            }
        )

    async def health(request: Request) -> Any:
        return JSONResponse(
            {
                "status": "ok",
                "upstream": "embedded" if svc.config.embedded else "openai",
                "voices": svc.voices.name,
                "recording": svc.recorder is not None,
                "in_flight": svc.in_flight,
            }
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return JSONResponse(api.error_body(str(detail)), status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(svc.close)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
            Route("/v1/completions", guarded(completions), methods=["POST"]),
            Route("/v1/models", guarded(models), methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.service = svc
    return app


def app_from_env() -> Starlette:
    """The app for a uvicorn worker process (the configuration comes from the environment)."""
    return create_app(config_from_env())
