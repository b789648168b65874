"""OpenAI-compatible backend against a REAL ``llama_cpp.server`` on the embedded SmolLM2."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from thoughtform.backends.base import (
    FinishEvent,
    GenerationRequest,
    Message,
    Sampling,
    TokenEvent,
)
from thoughtform.backends.openai import OpenAIBackend

pytestmark = pytest.mark.model
# The session fixture ``llama_server`` (a real llama_cpp.server) lives in tests/llama_server.py.
pytest_plugins = ["llama_server"]

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=24, seed=1)


def collect(
    backend: OpenAIBackend, req: GenerationRequest, **kw
) -> tuple[list[TokenEvent], FinishEvent]:
    toks: list[TokenEvent] = []
    for ev in backend.stream(req, **kw):
        if isinstance(ev, FinishEvent):
            return toks, ev
        toks.append(ev)
    raise AssertionError("no FinishEvent")


def plain(base: str, path: str, body: dict) -> dict:
    """The same request, non-streaming, straight over HTTP."""
    r = httpx.post(base + path, json={**body, "stream": False}, timeout=120)
    r.raise_for_status()
    return r.json()


def test_chat_stream_with_logprobs_matches_non_streaming(llama_server: str) -> None:
    b = OpenAIBackend(base_url=llama_server)
    msgs = (Message("user", "Name three colors."),)
    toks, fin = collect(b, GenerationRequest(messages=msgs, sampling=GREEDY, alternatives=4))
    assert fin.reason in ("stop", "length"), fin.message
    assert b.model_name.endswith(".gguf")  # discovered from /v1/models
    assert len(toks) >= 3
    assert all(t.logprob is not None and t.logprob <= 0 for t in toks)
    assert all(1 <= len(t.top) <= 4 for t in toks)
    assert all(a.logprob is not None and a.logprob <= 0 for t in toks for a in t.top)
    assert fin.timings["first_token_s"] > 0 and fin.usage["completion_tokens"] == len(toks)
    ref = plain(
        llama_server,
        "/chat/completions",
        {
            "messages": [{"role": "user", "content": "Name three colors."}],
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": 24,
            "seed": 1,
        },
    )
    assert "".join(t.text for t in toks) == ref["choices"][0]["message"]["content"]


def test_completion_mode_and_length(llama_server: str) -> None:
    b = OpenAIBackend(base_url=llama_server)
    req = GenerationRequest(
        prompt="The capital of France is",
        sampling=Sampling(temperature=0.0, top_p=1.0, max_tokens=5),
        alternatives=3,
    )
    toks, fin = collect(b, req)
    assert fin.reason == "length"
    assert len(toks) == 5
    assert all(t.logprob is not None and t.logprob <= 0 for t in toks)
    assert all(len(t.top) == 3 for t in toks)
    # The sampled token is among the alternatives, with the same logprob.
    for t in toks:
        match = [a for a in t.top if a.text == t.text]
        assert match and match[0].logprob == pytest.approx(t.logprob)
    ref = plain(
        llama_server,
        "/completions",
        {"prompt": "The capital of France is", "temperature": 0.0, "top_p": 1.0, "max_tokens": 5},
    )
    assert "".join(t.text for t in toks) == ref["choices"][0]["text"]


def test_cancel_mid_stream_then_server_still_answers(llama_server: str) -> None:
    b = OpenAIBackend(base_url=llama_server)
    cancel = threading.Event()
    req = GenerationRequest(
        messages=(Message("user", "Write a long story about a dragon."),),
        sampling=Sampling(temperature=0.8, max_tokens=400, seed=3),
        alternatives=2,
    )
    toks: list[TokenEvent] = []
    fin: FinishEvent | None = None
    for ev in b.stream(req, cancel):
        if isinstance(ev, FinishEvent):
            fin = ev
            break
        toks.append(ev)
        if len(toks) == 5:
            cancel.set()
    assert fin is not None and fin.reason == "cancelled"
    assert len(toks) == 5
    rate = fin.timings["tokens_per_s"]
    # The server let go of the request: had it kept generating the other ~395 tokens, a new
    # request would queue behind them; instead it is answered promptly and completely.
    t0 = time.monotonic()
    toks2, fin2 = collect(
        b, GenerationRequest(messages=(Message("user", "Hi"),), sampling=GREEDY, alternatives=1)
    )
    assert fin2.reason in ("stop", "length") and toks2
    assert time.monotonic() - t0 < 0.5 * 395 / rate


def test_cyrillic_and_emoji_stay_intact(llama_server: str) -> None:
    msgs = (Message("user", "Повтори: привет, мир 🙂🌍"),)
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=16, seed=1)
    ref = plain(
        llama_server,
        "/chat/completions",
        {
            "messages": [{"role": "user", "content": msgs[0].content}],
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": 16,
            "seed": 1,
        },
    )["choices"][0]["message"]["content"]
    # Without logprobs the text is exactly the server's reply.
    b = OpenAIBackend(base_url=llama_server, logprobs=False)
    toks, fin = collect(b, GenerationRequest(messages=msgs, sampling=sampling))
    got = "".join(t.text for t in toks)
    assert fin.reason in ("stop", "length")
    assert got == ref and "\ufffd" not in got
    assert any(ord(c) > 127 for c in got)
    # With logprobs: no replacement characters either (this server blanks a character split
    # across tokens in its logprob stream, so only its whole characters can be compared).
    toks, fin = collect(
        OpenAIBackend(base_url=llama_server),
        GenerationRequest(messages=msgs, sampling=sampling, alternatives=3),
    )
    got_lp = "".join(t.text for t in toks)
    assert fin.reason in ("stop", "length") and "\ufffd" not in got_lp
    assert all("\ufffd" not in a.text for t in toks for a in t.top)
    assert set(got_lp) <= set(ref)
