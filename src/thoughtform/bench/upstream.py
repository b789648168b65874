"""A scripted OpenAI-compatible upstream (Starlette): streams given token texts at a set rate,
optionally stamps each token with its send time, fails mid-stream or drops the connection.

The proxy benchmark measures added latency with it (each token's text is its send time, so the
client computes per-chunk latency on one clock) and the tests use it for upstream faults.
``python -m thoughtform.bench.upstream --port P [--rate R] [--tokens N] [--stamp]`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "synthetic"


@dataclass
class Script:
    """What the upstream does with each request."""

    tokens: Sequence[str] = ("Hello", " world", ".")
    rate: float = 0.0  # tokens per second; 0: as fast as possible
    stamp: bool = False  # each token's text is its send time (time.time_ns) instead
    fail_after: int | None = None  # send an error event after this many tokens
    drop_after: int | None = None  # end the body after this many tokens, no [DONE]
    logprobs: bool = True  # logprob items (with 2 alternatives) when the request asks
    # The token texts for one request body (instead of ``tokens``), e.g. an echo of its prompt.
    reply: Callable[[dict[str, Any]], Sequence[str]] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    chunks_sent: int = 0


def stamp_text(ns: int) -> str:
    """A token text carrying its send time (``" t<ns>"``; plain text to the voice parser)."""
    return f" t{ns}"


def read_stamps(text: str) -> list[int]:
    """The send times stamped in ``text`` (in order)."""
    return [int(p[1:]) for p in text.split() if p.startswith("t") and p[1:].isdigit()]


def _chunk(text: str, chat: bool, logprobs: bool, finish: str | None = None) -> bytes:
    choice: dict[str, Any]
    if chat:
        choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        if logprobs and text:
            alt = [
                {"token": text, "logprob": -0.1, "bytes": list(text.encode())},
                {"token": "x", "logprob": -2.5, "bytes": [120]},
            ]
            choice["logprobs"] = {
                "content": [
                    {
                        "token": text,
                        "logprob": -0.1,
                        "bytes": list(text.encode()),
                        "top_logprobs": alt,
                    }
                ]
            }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        if logprobs and text:
            choice["logprobs"] = {
                "tokens": [text],
                "token_logprobs": [-0.1],
                "top_logprobs": [{text: -0.1, "x": -2.5}],
            }
    body = {
        "id": "synthetic",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [choice],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def upstream_app(script: Script) -> Starlette:
    """The app serving ``script`` at ``/v1/chat/completions`` and ``/v1/completions``."""

    async def generate(request: Request) -> Response:
        body = await request.json()
        script.requests.append(body)
        chat = request.url.path.endswith("/chat/completions")
        want_lp = script.logprobs and bool(body.get("logprobs"))
        limit = int(body.get("max_tokens") or 16)
        texts = list(script.reply(body) if script.reply else script.tokens)

        async def events() -> AsyncIterator[bytes]:
            period = 1.0 / script.rate if script.rate > 0 else 0.0
            t_next = time.perf_counter()
            n = 0
            total = limit if script.stamp else min(limit, len(texts))
            try:
                for i in range(total):
                    if script.fail_after is not None and n >= script.fail_after:
                        err = {"error": {"message": "synthetic upstream failure", "code": 500}}
                        yield b"data: " + json.dumps(err).encode() + b"\n\n"
                        return
                    if script.drop_after is not None and n >= script.drop_after:
                        return
                    if period:
                        t_next += period
                        delay = t_next - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    elif i % 64 == 63:
                        await asyncio.sleep(0)
                    text = stamp_text(time.time_ns()) if script.stamp else texts[i]
                    yield _chunk(text, chat, want_lp)
                    n += 1
                    script.chunks_sent += 1
                yield _chunk("", chat, False, "length" if n >= limit else "stop")
                yield b"data: [DONE]\n\n"
            except asyncio.CancelledError:
                script.cancelled.set()
                raise

        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this upstream only streams"}}, 400)
        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a script from the command line (the benchmark runs it in its own process)."""
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m thoughtform.bench.upstream")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--stamp", action="store_true")
    a = ap.parse_args(argv)
    script = Script(tokens=tuple(f" w{i}" for i in range(100_000)), rate=a.rate, stamp=a.stamp)
    uvicorn.run(
        upstream_app(script), host="127.0.0.1", port=a.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
