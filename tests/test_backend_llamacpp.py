"""The embedded llama.cpp backend with telemetry from a logits processor (real model)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from thoughtform.backends import (
    FinishEvent,
    GenerationRequest,
    Message,
    Sampling,
    TokenEvent,
    create_backend,
)
from thoughtform.generate import Generation
from thoughtform.trace import load_trace

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def backend() -> Iterator[object]:
    b = create_backend("llamacpp")
    yield b
    b.close()


def req(
    text: str, n: int = 24, temperature: float = 0.0, seed: int | None = 1, **kw: object
) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("user", text),),
        sampling=Sampling(temperature=temperature, max_tokens=n, seed=seed, **kw),  # type: ignore[arg-type]
        alternatives=10,
    )


def collect(it: Iterator[object]) -> tuple[list[TokenEvent], FinishEvent]:
    toks: list[TokenEvent] = []
    for ev in it:
        if isinstance(ev, FinishEvent):
            return toks, ev
        toks.append(ev)  # type: ignore[arg-type]
    raise AssertionError("stream ended without a FinishEvent")


def test_greedy_telemetry_is_consistent(backend) -> None:  # type: ignore[no-untyped-def]
    toks, fin = collect(backend.stream(req("Name three colours.")))
    assert fin.reason in ("stop", "length")
    assert len(toks) >= 5
    vocab_log = math.log(49152)
    for t in toks:
        assert t.token_id is not None and t.bytes is not None
        assert t.logprob is not None and t.logprob <= 1e-6
        assert len(t.top) == 10
        lps = [a.logprob for a in t.top]
        assert lps == sorted(lps, reverse=True)
        # Greedy decoding picks the most likely token: the chosen one is the top alternative.
        assert t.top[0].token_id == t.token_id
        assert t.top[0].logprob == pytest.approx(t.logprob)
        assert t.entropy is not None and 0.0 <= t.entropy <= vocab_log
        # Probabilities of the alternatives sum to at most 1.
        assert sum(math.exp(a.logprob) for a in t.top) <= 1.0 + 1e-6


def test_text_integrity_with_split_characters(backend) -> None:  # type: ignore[no-untyped-def]
    toks, _ = collect(backend.stream(req("Повтори: Привет, мир! 🙂 日本語", n=40)))
    text = "".join(t.text for t in toks)
    # Only a generation cut off mid-character may end in U+FFFD (its bytes stay in the trace).
    assert "\ufffd" not in text.rstrip("\ufffd")
    assert b"".join(t.bytes for t in toks if t.bytes).decode("utf-8", "replace") == text
    assert any(ord(c) > 0x400 for c in text)


def test_seed_makes_sampling_repeatable(backend) -> None:  # type: ignore[no-untyped-def]
    a, _ = collect(backend.stream(req("Tell me a story.", n=20, temperature=0.9, seed=7)))
    b, _ = collect(backend.stream(req("Tell me a story.", n=20, temperature=0.9, seed=7)))
    assert [t.token_id for t in a] == [t.token_id for t in b]


def test_max_tokens_gives_length(backend) -> None:  # type: ignore[no-untyped-def]
    toks, fin = collect(backend.stream(req("Write a long essay about the sea.", n=5)))
    assert len(toks) == 5 and fin.reason == "length"


def test_cancel_event_stops_and_keeps_partial(backend) -> None:  # type: ignore[no-untyped-def]
    cancel = threading.Event()
    toks: list[TokenEvent] = []
    fin = None
    for ev in backend.stream(req("Write a long essay about the sea.", n=200), cancel):
        if isinstance(ev, FinishEvent):
            fin = ev
            break
        toks.append(ev)
        if len(toks) == 3:
            cancel.set()
    assert fin is not None and fin.reason == "cancelled"
    assert len(toks) == 3


def test_closing_the_stream_frees_the_model(backend) -> None:  # type: ignore[no-untyped-def]
    it = backend.stream(req("Write a long essay about the sea.", n=200))
    next(it)
    it.close()
    # The lock was released: a new stream starts at once instead of reporting "busy".
    toks, fin = collect(backend.stream(req("Say hi.", n=3)))
    assert fin.reason in ("stop", "length") and toks


def test_each_token_decodes_while_the_consumer_works(backend) -> None:  # type: ignore[no-untyped-def]
    """The loop decodes a token on its worker while the consumer handles the event: a slow
    consumer gets the same reply, and after a stop string (the token that ended it already
    decoded) the cache holds exactly what the backend says it holds."""
    fast, _ = collect(backend.stream(req("Name three colours.", n=24)))
    slow: list[TokenEvent] = []
    for ev in backend.stream(req("Name three colours.", n=24)):
        if isinstance(ev, FinishEvent):
            break
        time.sleep(0.03)  # a slow consumer: two decode steps' worth per token
        slow.append(ev)
    assert [t.token_id for t in slow] == [t.token_id for t in fast]
    text = "".join(t.text for t in fast)
    stop = text[len(text) // 2 :][:3]
    assert stop.strip()
    toks, fin = collect(backend.stream(req("Name three colours.", n=24, stop=[stop])))
    assert fin.reason == "stop" and stop not in "".join(t.text for t in toks)
    c = backend._c  # the cache's last position in sequence 0 is the last token it records
    assert c.llama_memory_seq_pos_max(backend._mem, 0) == len(backend._past) - 1
    # An unseeded follow-up reuses that cache; its greedy reply matches a fresh evaluation.
    again, _ = collect(backend.stream(req("Name three colours. Then stop.", n=8, seed=None)))
    fresh, _ = collect(backend.stream(req("Name three colours. Then stop.", n=8)))
    assert [t.token_id for t in again] == [t.token_id for t in fresh]


def test_generation_trace_on_disk(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "g.jsonl"
    system = "Answer as two voices. Start each on its own line: [Echo] then [Doubt]."
    request = GenerationRequest(
        messages=(Message("system", system), Message("user", "Is the sea blue?")),
        sampling=Sampling(temperature=0.0, max_tokens=40, seed=1),
        alternatives=5,
    )
    trace = Generation(backend, request, "seed", trace_path=out).run()
    loaded = load_trace(out)
    assert loaded.text == trace.text and len(loaded.tokens) == len(trace.tokens) > 0
    assert all(t.voice is not None for t in loaded.tokens)
    assert all(len(t.top) == 5 for t in loaded.tokens if t.token_id is not None)
    assert loaded.finish is not None and loaded.finish["reason"] in ("stop", "length")
    assert [s.voice for s in loaded.segments] == [s.voice for s in trace.segments]


def test_logit_bias_steers_while_telemetry_shows_the_raw_distribution(backend) -> None:  # type: ignore[no-untyped-def]
    plain, _ = collect(backend.stream(req("Name three colours.", n=3)))
    first = plain[0].token_id
    assert first is not None
    r = GenerationRequest(
        messages=(Message("user", "Name three colours."),),
        sampling=Sampling(temperature=0.0, max_tokens=3, seed=1),
        alternatives=10,
        logit_bias={first: -100.0},
    )
    steered, _ = collect(backend.stream(r))
    assert steered[0].token_id != first
    # The alternatives are the model's own view: the banned token is still its top choice.
    assert steered[0].top[0].token_id == first


def test_grammar_constrains_the_reply(backend) -> None:  # type: ignore[no-untyped-def]
    r = GenerationRequest(
        messages=(Message("user", "Say something."),),
        sampling=Sampling(temperature=0.0, max_tokens=12, seed=1),
        grammar='root ::= "[Echo]\\n" [a-z ]+',
    )
    toks, fin = collect(backend.stream(r))
    text = "".join(t.text for t in toks)
    assert text.startswith("[Echo]\n")
    assert set(text[7:]) <= set("abcdefghijklmnopqrstuvwxyz ")
    bad = GenerationRequest(messages=(Message("user", "x"),), grammar="root ::= (")
    toks, fin = collect(backend.stream(bad))
    assert fin.reason == "error" and "grammar" in fin.message and not toks


def test_missing_model_or_adapter_is_a_clear_error(tmp_path: Path) -> None:
    from thoughtform.backends import BackendError

    with pytest.raises(BackendError, match=r"nope\.gguf: model file not found"):
        create_backend("llamacpp", model=str(tmp_path / "nope.gguf"))
    with pytest.raises(BackendError, match=r"lora\.gguf: LoRA adapter file not found"):
        create_backend("llamacpp", lora_path=str(tmp_path / "lora.gguf"))
