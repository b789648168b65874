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
from thoughtform.evaluate.adherence import form_check
from thoughtform.generate import Generation
from thoughtform.steer import SteerPlan, Structure
from thoughtform.trace import Trace

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


# ------------------------------------------------------------------ steering (stop-and-continue)

# One worked example makes the plain model answer in bracket voices; greedy, it says
# "[Echo] ... [Pulse] ..." to this question (measured), so those are the voices to steer.
FEW_SHOT = (
    "<|im_start|>user\nWhat is the sea?<|im_end|>\n<|im_start|>assistant\n"
    "[Echo]\nThe sea, the sea, it keeps returning.\n\n[Doubt]\nBut is it the same sea each"
    " time?\n\n[Pulse]\nSalt on the lips.<|im_end|>\n"
    "<|im_start|>user\nWhat is the wind?<|im_end|>\n<|im_start|>assistant\n"
)


def steered(
    backend: OpenAIBackend,
    plan: SteerPlan,
    max_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 1,
) -> Trace:
    req = GenerationRequest(
        prompt=FEW_SHOT,
        sampling=Sampling(temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed),
        alternatives=10,
    )
    return Generation(backend, req, voices="seed", steer=plan).run()


def voice_blocks(trace: Trace) -> list[str]:
    return [s.voice for s in trace.segments if s.voice != "main"]


def test_next_voice_prefill_opens_the_reply(llama_server: str) -> None:
    b = OpenAIBackend(base_url=llama_server)
    trace = steered(b, SteerPlan(next_voice="Doubt"), max_tokens=24)
    assert b.server_kind() == "llama-cpp-python"
    assert voice_blocks(trace)[0] == "Doubt"
    assert trace.tokens[0].forced and trace.tokens[0].text == "[Doubt]\n"
    first = trace.voice_choices[0]
    # The model itself would have opened with Echo (probed before the prefill).
    assert first["forced"] and first["approximate"] and first["chosen"] == "Doubt"
    assert max(first["probs"], key=first["probs"].get) == "Echo"
    assert sum(first["probs"].values()) <= 1.0


@pytest.mark.parametrize("logprobs", [True, False], ids=["top-k", "logit-bias"])
def test_mute_yields_no_block_of_that_voice(llama_server: str, logprobs: bool) -> None:
    b = OpenAIBackend(base_url=llama_server, logprobs=logprobs)
    trace = steered(b, SteerPlan(mute=frozenset({"Pulse"})))
    assert trace.finish["reason"] in ("stop", "length"), trace.finish["message"]
    got = voice_blocks(trace)
    assert "Pulse" not in got and len(got) >= 2
    reply = "".join(t.text for t in trace.tokens)
    assert "[Pulse]" not in reply
    # Where the marker was re-drawn (from the top-k, or by the server under logit_bias).
    assert any(t.steered and not t.forced for t in trace.tokens)
    if logprobs:  # the model wanted Pulse at a boundary, and did not get it
        wanted = [c for c in trace.voice_choices if max(c["probs"], key=c["probs"].get) == "Pulse"]
        assert wanted and all(c["chosen"] != "Pulse" for c in wanted)


def test_temperature_zero_voice_gives_the_same_block_on_two_seeds(llama_server: str) -> None:
    b = OpenAIBackend(base_url=llama_server)
    plan = SteerPlan(next_voice="Echo", voice_sampling={"Echo": (0.0, None)})
    a, c = (steered(b, plan, temperature=1.5, seed=s) for s in (1, 2))

    def echo(t: Trace) -> str:
        return next(s.text for s in t.segments if s.voice == "Echo")

    assert echo(a) == echo(c) and echo(a)
    # The rest was sampled at 1.5 with different seeds: new requests after the next marker.
    ta, tc = ("".join(t.text for t in x.tokens) for x in (a, c))
    assert ta != tc
    assert a.finish["usage"]["requests"] >= 2


def test_structure_via_grammar_is_well_formed(llama_server: str) -> None:
    b = OpenAIBackend(base_url=llama_server)
    req = GenerationRequest(
        messages=(Message("user", "What is rain?"),),  # plain chat: no voice prompt at all
        sampling=Sampling(temperature=0.7, top_p=1.0, max_tokens=60, seed=1),
        alternatives=5,
    )
    plan = SteerPlan(structure=Structure(max_blocks=2))
    trace = Generation(b, req, voices="seed", steer=plan).run()
    reply = "".join(t.text for t in trace.tokens)
    assert trace.finish["reason"] in ("stop", "length"), trace.finish["message"]
    check = form_check(reply, "seed")
    assert check.ok, (reply, check)
