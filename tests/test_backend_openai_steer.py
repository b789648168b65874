"""Steering on the OpenAI-compatible backend (stop-and-continue, no token-level control):
against a recorded llama-cpp-python byte stream and a toy model behind a local HTTP server
(tests/toy_openai_server.py) that plays vLLM, llama.cpp, llama-cpp-python or a plain server."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_backend_openai import RawServer, replay
from toy_openai_server import ToyServer

from thoughtform.backends.base import BackendError, GenerationRequest, Message, Sampling
from thoughtform.backends.openai import (
    SERVER_STEERING,
    SERVERS,
    STEERING_FEATURES,
    OpenAIBackend,
    _Watch,
    marker_start,
    sample_alternative,
)
from thoughtform.generate import Generation
from thoughtform.steer import Conductor, SteerPlan, Structure
from thoughtform.trace import Alternative, Trace
from thoughtform.voices import resolve_voice_set

FIX = Path(__file__).parent / "fixtures" / "openai"
SEED = resolve_voice_set("seed")


def pieces(*parts: str) -> list[str]:
    """A reply as toy tokens: markers split as SmolLM2 splits them ('[', 'Dou', 'bt', ']')."""
    split = {
        "[Doubt]": ["[", "Dou", "bt", "]"],
        "[Echo]": ["[", "E", "cho", "]"],
        "[Pulse]": ["[", "P", "ulse", "]"],
    }
    out: list[str] = []
    for p in parts:
        out += split.get(p, [p])
    return out


DOUBT = ["[Doubt]", "\n", "Is", " it", "?", "\n", "\n"]
ECHO = ["[Echo]", "\n", "It", " is", ".", "\n", "\n"]
PULSE = ["[Pulse]", "\n", "Thump", ".", "\n", "\n"]
# At the reply start the toy prefers Doubt (0.8 of 1.55 after '['), then Echo, then Pulse.
SCRIPTS = [
    (pieces(*DOUBT, *ECHO[:-2]), 0.8),
    (pieces(*ECHO, *DOUBT[:-2]), 0.3),
    (pieces(*ECHO, *PULSE[:-2]), 0.25),
    (pieces(*PULSE, *ECHO[:-2]), 0.2),
    (pieces(*DOUBT, *PULSE[:-2]), 0.1),
]


@pytest.fixture
def toy() -> Iterator[type[ToyServer]]:
    servers: list[ToyServer] = []

    def start(scripts=SCRIPTS, **kw) -> ToyServer:
        s = ToyServer(scripts, **kw)
        servers.append(s)
        return s

    yield start  # type: ignore[misc]
    for s in servers:
        s.__exit__()


def req(
    temperature: float = 0.0, max_tokens: int = 40, seed: int = 1, chat: bool = False, alts: int = 5
) -> GenerationRequest:
    s = Sampling(temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed)
    if chat:
        return GenerationRequest(messages=(Message("user", "Q"),), sampling=s, alternatives=alts)
    return GenerationRequest(prompt="Q:", sampling=s, alternatives=alts)


def generate(backend: OpenAIBackend, request: GenerationRequest, plan: SteerPlan | None) -> Trace:
    return Generation(backend, request, voices=SEED, steer=plan).run()


def text(trace: Trace) -> str:
    return "".join(t.text for t in trace.tokens)


def blocks(trace: Trace) -> list[str]:
    return [s.voice for s in trace.segments if s.voice != "main"]


# ------------------------------------------------------------------ pieces of the engine


def test_marker_start_only_at_a_line_start() -> None:
    assert marker_start("", "[") == 0
    assert marker_start("", "  [Echo") == 2
    assert marker_start("text", "[Echo") == -1  # mid-line: not a marker
    assert marker_start("text", ".\n\n[E") == 3
    assert marker_start("  ", "\t[") == 1
    assert marker_start("", "Hello") == -1


def test_watch_holds_a_marker_split_across_tokens_and_releases_non_markers() -> None:
    from thoughtform.backends.base import TokenEvent

    keys = sorted(
        [(f"[{v.name.lower()}]", v.name) for v in SEED.voices], key=lambda kv: -len(kv[0])
    )
    w = _Watch(keys, "")
    out, hit = w.push(TokenEvent(text="["))
    assert out == [] and hit is None
    out, hit = w.push(TokenEvent(text="Dou"))
    assert out == [] and hit is None
    out, hit = w.push(TokenEvent(text="bt]\n"))
    assert out == [] and hit is not None and hit.voice == "Doubt" and len(hit.held) == 3
    # Not a declared marker: released as soon as that is certain.
    w = _Watch(keys, "")
    w.push(TokenEvent(text="["))
    out, hit = w.push(TokenEvent(text="1"))
    assert [t.text for t in out] == ["[", "1"] and hit is None
    # A Markdown link at a line start is no marker either.
    w = _Watch(keys, "")
    out, hit = w.push(TokenEvent(text="[Echo](http://x)"))
    assert hit is None and out
    # Mid-line brackets pass straight through.
    w = _Watch(keys, "so")
    out, hit = w.push(TokenEvent(text=" [Echo]"))
    assert hit is None and [t.text for t in out] == [" [Echo]"]


def test_sample_alternative_temperature_and_top_p() -> None:
    alts = [
        Alternative("a", math.log(0.6)),
        Alternative("b", math.log(0.3)),
        Alternative("c", None),
    ]
    rng = random.Random(0)
    got = sample_alternative(alts, 0.0, 1.0, rng)
    assert got is not None and got[0].text == "a" and got[1] == 0.0
    # top_p 0.5 keeps only the likeliest.
    assert {sample_alternative(alts, 1.0, 0.5, rng)[0].text for _ in range(50)} == {"a"}  # type: ignore[index]
    draws = [sample_alternative(alts, 1.0, 1.0, rng)[0].text for _ in range(3000)]  # type: ignore[index]
    assert abs(draws.count("a") / 3000 - 2 / 3) < 0.04  # renormalised over a and b
    assert sample_alternative([Alternative("x", None)], 1.0, 1.0, rng) is None


def test_record_choice_is_chosen_by_the_next_marker() -> None:
    c = Conductor(SEED)
    c.feed("x", [])
    ch = c.record_choice({"Echo": 0.5}, forced=True)
    assert ch.approximate and ch.forced and ch.token == 1 and c.choices == [ch]
    from thoughtform.parse import VoiceParser

    events = VoiceParser(SEED).feed("[Echo]\nhi", 1)
    c.feed("[Echo]\nhi", events)
    assert ch.chosen == "Echo"
    assert ch.to_dict()["approximate"] is True


def test_capabilities_and_steering_table() -> None:
    b = OpenAIBackend(base_url="http://127.0.0.1:9", model="m", server="vllm")
    caps = b.capabilities
    assert caps.token_control is False and caps.voice_scores == "approximate" and caps.grammar
    assert b.steering["server"] == "vllm" and set(STEERING_FEATURES) <= set(b.steering)
    assert set(SERVER_STEERING) == set(SERVERS)
    auto = OpenAIBackend(base_url="http://127.0.0.1:9", model="m")
    assert auto.capabilities.grammar is False  # unknown until detected
    assert "vllm:" in auto.steering["structure"] and "llamacpp:" in auto.steering["structure"]
    assert OpenAIBackend(base_url="http://x:1", logprobs=False).capabilities.voice_scores == "none"
    with pytest.raises(BackendError, match="server must be one of"):
        OpenAIBackend(base_url="http://x:1", server="tgi")


# ------------------------------------------------------------------ recorded byte stream


def test_who_speaks_next_from_a_recorded_stream_matches_brute_force(serve) -> None:
    """A real llama-cpp-python stream (SmolLM2, few-shot voices prompt, greedy): no plan, so
    nothing is steered; each marker's probabilities come from the top_logprobs along it."""
    raw = (FIX / "llamacpp_python_voices.sse").read_bytes()
    chunks = [
        json.loads(line[6:])["choices"][0]
        for line in raw.decode().splitlines()
        if line.startswith("data: {")
    ]
    tops = [c["logprobs"]["top_logprobs"][0] for c in chunks if c["logprobs"]]
    srv = serve(replay(raw, size=50))
    trace = generate(OpenAIBackend(base_url=srv.url, model="m"), req(max_tokens=24), None)
    assert len(srv.requests) == 1  # watching markers costs no request
    assert text(trace) == "".join(c["text"] for c in chunks)
    assert not any(t.steered or t.forced for t in trace.tokens)
    assert blocks(trace) == ["Echo", "Doubt"]
    first, second = trace.voice_choices
    assert (first["token"], first["chosen"], second["chosen"]) == (0, "Echo", "Doubt")
    assert first["approximate"] is True and first["forced"] is False
    e = math.exp
    # Boundary 1 (token 0): '[' then the name's first token; E -> Echo, P -> Pulse,
    # D and Dou -> Doubt, S -> Shift ('[s' only opens Shift among the seed voices).
    p0, p1 = tops[0], tops[1]
    want = {
        "Echo": e(p0["["]) * e(p1["E"]),
        "Pulse": e(p0["["]) * e(p1["P"]),
        "Doubt": e(p0["["]) * (e(p1["D"]) + e(p1["Dou"])),
        "Shift": e(p0["["]) * e(p1["S"]),
    }
    for v, p in want.items():
        assert first["probs"][v] == pytest.approx(p, abs=1e-6)
    assert sum(first["probs"].values()) <= 1.0
    # Boundary 2 (token 14, after "\n\n"): same rule from its own top_logprobs.
    k = second["token"]
    assert trace.tokens[k].text == "["
    q0, q1 = tops[k], tops[k + 1]
    assert second["probs"]["Doubt"] == pytest.approx(
        e(q0["["]) * (e(q1["Dou"]) + e(q1["D"])), abs=1e-6
    )
    assert second["probs"]["Pulse"] == pytest.approx(e(q0["["]) * e(q1["P"]), abs=1e-6)
    assert sum(second["probs"].values()) <= 1.0


# ------------------------------------------------------------------ next voice


def test_next_voice_is_prefilled_and_scored(toy) -> None:
    srv = toy(kind="llama-cpp-python")
    b = OpenAIBackend(base_url=srv.url)
    plain = generate(b, req(), None)
    assert blocks(plain) == ["Doubt", "Echo"]  # what the toy says by itself
    srv.requests.clear()
    trace = generate(b, req(), SteerPlan(next_voice="Pulse"))
    assert text(trace) == "[Pulse]\nThump.\n\n[Echo]\nIt is."
    assert blocks(trace) == ["Pulse", "Echo"]
    forced = [t for t in trace.tokens if t.forced]
    assert [t.text for t in forced] == ["[Pulse]\n"] and forced[0].steered
    gens = srv.generations()
    # Two one-token probes (the reply start, then after the shared '['), then the reply.
    assert [g["max_tokens"] for g in gens[:2]] == [1, 1]
    assert [srv.reply_of(g) for g in gens] == ["", "[", "[Pulse]\n"]
    first = trace.voice_choices[0]
    assert first["forced"] is True and first["chosen"] == "Pulse" and first["approximate"]
    # Brute force on the toy: the exact probability of each marker at the reply start.
    for v in ("Doubt", "Echo", "Pulse"):
        assert first["probs"][v] == pytest.approx(srv.model.marker_prob("", f"[{v}]"), abs=1e-6)


def test_next_voice_set_live_takes_the_next_boundary(toy) -> None:
    srv = toy()
    b = OpenAIBackend(base_url=srv.url)
    g = Generation(b, req(), voices=SEED)
    for i, _ in enumerate(g):
        if i == 2:  # inside the first (Doubt) block
            g.conductor.set_next_voice("Pulse")  # type: ignore[union-attr]
    trace = g.trace
    assert blocks(trace) == ["Doubt", "Pulse"]
    assert text(trace) == "[Doubt]\nIs it?\n\n[Pulse]\nThump."
    second = trace.voice_choices[1]
    assert second["forced"] is True and second["chosen"] == "Pulse"
    assert second["probs"]["Echo"] > second["probs"]["Pulse"]  # the model wanted Echo
    # The Echo marker the model began was never emitted; the reply went on after Pulse.
    assert srv.reply_of(srv.generations()[-1]) == "[Doubt]\nIs it?\n\n[Pulse]\n"


# ------------------------------------------------------------------ mute


def test_mute_repicks_the_marker_token_from_the_top_k(toy) -> None:
    srv = toy()
    b = OpenAIBackend(base_url=srv.url)
    trace = generate(b, req(), SteerPlan(mute=frozenset({"Doubt"})))
    assert "Doubt" not in blocks(trace) and "[Dou" not in text(trace)
    assert blocks(trace) == ["Echo", "Pulse"]
    picked = [t for t in trace.tokens if t.steered]
    assert [t.text for t in picked] == ["E", "P"]  # the re-picked name tokens
    assert all(not t.forced and t.logprob is not None for t in picked)
    # Doubt is what the model wanted at both boundaries; it is recorded, not chosen.
    assert [c["chosen"] for c in trace.voice_choices] == ["Echo", "Pulse"]
    assert all(max(c["probs"], key=c["probs"].get) == "Doubt" for c in trace.voice_choices)
    # Each cut continues from the reply so far, after the re-picked token.
    assert [srv.reply_of(g) for g in srv.generations()] == ["", "[E", "[Echo]\nIt is.\n\n[P"]


def test_mute_set_live_applies_from_the_next_boundary(toy) -> None:
    srv = toy()
    g = Generation(OpenAIBackend(base_url=srv.url), req(), voices=SEED)
    for i, _ in enumerate(g):
        if i == 2:
            g.conductor.set_muted("Echo", True)  # type: ignore[union-attr]
    assert blocks(g.trace) == ["Doubt", "Pulse"]


def test_mute_without_logprobs_uses_logit_bias_by_token_id(toy) -> None:
    srv = toy(kind="llama-cpp-python")
    b = OpenAIBackend(base_url=srv.url, logprobs=False)
    trace = generate(b, req(), SteerPlan(mute=frozenset({"Doubt"})))
    assert "Doubt" not in blocks(trace) and blocks(trace)[0] == "Echo"
    biased = [g for g in srv.generations() if "logit_bias" in g]
    assert biased and all(g["max_tokens"] == 1 for g in biased)  # one position only
    banned = {srv.model.vocab[int(k)] for k in biased[0]["logit_bias"]}
    assert banned == {"Dou", "bt"}  # '[' and ']' are shared with allowed markers
    assert any(p == "/extras/tokenize" for _, p, _ in srv.requests)


def test_a_cut_hangs_up_before_the_next_request(toy) -> None:
    # A slow server: had the client not hung up, the first reply would run for ~2 s more.
    srv = toy(kind="llama-cpp-python", delay=0.05)
    b = OpenAIBackend(base_url=srv.url, logprobs=False)
    t0 = time.monotonic()
    trace = generate(b, req(), SteerPlan(mute=frozenset({"Doubt"})))
    assert "Doubt" not in blocks(trace)
    gens = srv.generations()
    assert "logit_bias" in gens[1] and gens[1]["max_tokens"] == 1
    # When the one-token request came, the first stream was closed already: a one-slot server
    # would otherwise have queued it behind the rest of the first reply.
    assert srv.open_at_start[1] == [] and all(o == [] for o in srv.open_at_start)
    assert time.monotonic() - t0 < 2.0


def test_mute_without_logprobs_or_tokenizer_forces_another_voice(toy) -> None:
    srv = toy(kind="openai")
    b = OpenAIBackend(base_url=srv.url, logprobs=False)
    trace = generate(b, req(), SteerPlan(mute=frozenset({"Doubt"})))
    assert "Doubt" not in blocks(trace) and blocks(trace)
    assert any(t.forced for t in trace.tokens)
    assert "replaced by another voice" in trace.finish["message"]


def test_mute_on_a_chat_reply_the_server_cannot_continue_ends_with_an_error(toy) -> None:
    srv = toy(kind="llama-cpp-python")
    trace = generate(
        OpenAIBackend(base_url=srv.url), req(chat=True), SteerPlan(mute=frozenset({"Doubt"}))
    )
    assert trace.finish["reason"] == "error"
    assert "muted voice Doubt started" in trace.finish["message"]
    assert "[Dou" not in text(trace)


# ------------------------------------------------------------------ per-voice sampling


def test_per_voice_sampling_switches_at_each_marker(toy) -> None:
    srv = toy()
    b = OpenAIBackend(base_url=srv.url)
    plan = SteerPlan(voice_sampling={"Doubt": (0.0, 0.9), "Echo": (0.0, 0.5)})
    trace = generate(b, req(temperature=0.0), plan)
    assert blocks(trace) == ["Doubt", "Echo"]
    sampling = [(g["temperature"], g["top_p"], srv.reply_of(g)) for g in srv.generations()]
    assert sampling == [
        (0.0, 1.0, ""),  # main: the request's own
        (0.0, 0.9, "[Doubt]"),  # after the Doubt marker
        (0.0, 0.5, "[Doubt]\nIs it?\n\n[Echo]"),
    ]
    # Tokens sampled with other settings than the request's are marked steered.
    doubt_text = [t for t in trace.tokens if t.voice == "Doubt" and t.text == "Is"]
    assert doubt_text and doubt_text[0].steered


def test_temperature_zero_voice_repeats_across_seeds_while_others_vary(toy) -> None:
    # Echo's text can go two ways, and so can Doubt's.
    scripts = [
        *SCRIPTS,
        (pieces(*ECHO[:2], "It", " was", ".", "\n", "\n", "[Doubt]", "\n", "Maybe", "."), 0.2),
        (pieces(*ECHO, "[Doubt]", "\n", "Maybe", "."), 0.3),
    ]
    srv = toy(scripts)
    b = OpenAIBackend(base_url=srv.url)
    plan = SteerPlan(next_voice="Echo", voice_sampling={"Echo": (0.0, None)})
    replies = [text(generate(b, req(temperature=3.0, seed=s), plan)) for s in range(1, 7)]
    # Echo at temperature 0: the same block on every seed (its marker, and the next marker,
    # are sampled while Echo speaks); Doubt at the request's 3.0: not.
    assert all(r.startswith("[Echo]\nIt is.\n\n[Doubt]\n") for r in replies)
    assert len({r.split("[Doubt]\n")[1] for r in replies}) == 2


def test_per_voice_sampling_on_chat_without_prefill_is_noted(toy) -> None:
    srv = toy(kind="llama-cpp-python")
    trace = generate(
        OpenAIBackend(base_url=srv.url),
        req(chat=True),
        SteerPlan(voice_sampling={"Doubt": (0.5, None)}),
    )
    assert trace.finish["reason"] == "stop"
    assert "per-voice sampling not applied" in trace.finish["message"]
    assert len(srv.generations()) == 1


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("vllm", {"continue_final_message": True, "add_generation_prompt": False}),
        ("llamacpp", {}),
    ],
)
def test_chat_continuation_per_server(toy, kind: str, extra: dict) -> None:
    srv = toy(kind=kind)
    trace = generate(OpenAIBackend(base_url=srv.url), req(chat=True), SteerPlan(next_voice="Pulse"))
    assert blocks(trace) == ["Pulse", "Echo"]
    last = srv.generations()[-1]
    assert last["messages"][-1] == {"role": "assistant", "content": "[Pulse]\n"}
    for k, v in extra.items():
        assert last[k] == v
    if not extra:
        assert "continue_final_message" not in last


def test_next_voice_on_chat_without_prefill_is_a_clear_error(toy) -> None:
    srv = toy(kind="llama-cpp-python")
    trace = generate(OpenAIBackend(base_url=srv.url), req(chat=True), SteerPlan(next_voice="Echo"))
    assert trace.finish["reason"] == "error" and trace.tokens == []
    assert "cannot prefill a chat reply" in trace.finish["message"]
    assert srv.generations() == []


# ------------------------------------------------------------------ structure


@pytest.mark.parametrize(
    ("kind", "field"), [("llamacpp", "grammar"), ("llama-cpp-python", "grammar"), ("vllm", "so")]
)
def test_structure_sends_the_grammar_the_server_takes(toy, kind: str, field: str) -> None:
    srv = toy(kind=kind)
    plan = SteerPlan(next_voice="Echo", structure=Structure(max_blocks=2))
    trace = generate(OpenAIBackend(base_url=srv.url), req(max_tokens=60), plan)
    (body,) = srv.generations()
    g = body["grammar"] if field == "grammar" else body["structured_outputs"]["grammar"]
    rules = dict(line.split(" ::= ", 1) for line in g.strip().split("\n"))
    # The next voice became the grammar's only first voice (Echo is the set's first voice).
    assert rules["root"] == "b1-v0" and rules["b1-v0"].startswith('"[Echo]\\n" body')
    assert "b3-v0" not in rules  # max_blocks=2
    assert trace.finish["reason"] in ("stop", "length")
    assert all(t.steered for t in trace.tokens)  # every token was sampled under the grammar


def test_structure_on_a_server_without_grammars_is_an_error(toy) -> None:
    srv = toy(kind="openai")
    trace = generate(OpenAIBackend(base_url=srv.url), req(), SteerPlan(structure=Structure()))
    assert trace.finish["reason"] == "error"
    assert trace.finish["message"].startswith("structure is not supported by this server (openai")
    assert srv.generations() == []


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize("kind", ["vllm", "llamacpp", "llama-cpp-python", "openai"])
def test_server_kind_is_detected(toy, kind: str) -> None:
    srv = toy(kind=kind)
    assert OpenAIBackend(base_url=srv.url).server_kind() == kind


def test_props_and_extras_probes_when_owned_by_says_nothing(toy) -> None:
    srv = toy(kind="llamacpp")
    b = OpenAIBackend(base_url=srv.url)
    b._models = [{"id": "x", "owned_by": "organization"}]  # a server that hides its name
    assert b.server_kind() == "llamacpp"
    assert ("GET", "/props", {}) in srv.requests


def test_configured_server_kind_needs_no_probe(toy) -> None:
    srv = toy(kind="vllm")
    b = OpenAIBackend(base_url=srv.url, model="toy", server="llamacpp")
    assert b.server_kind() == "llamacpp" and srv.requests == []


def test_plain_requests_never_probe(serve) -> None:
    srv = serve(replay((FIX / "llamacpp_python_voices.sse").read_bytes()))
    b = OpenAIBackend(base_url=srv.url, model="m")
    generate(b, req(), SteerPlan(voice_sampling={"Doubt": (0.0, None)}))
    assert all(r.method == "POST" and r.path == "/v1/completions" for r in srv.requests)


# ------------------------------------------------------------------ cancel


def test_cancel_during_a_steered_reply(toy) -> None:
    srv = toy()
    cancel = threading.Event()
    g = Generation(
        OpenAIBackend(base_url=srv.url),
        req(),
        voices=SEED,
        steer=SteerPlan(mute=frozenset({"Doubt"})),
        cancel=cancel,
    )
    for i, _ in enumerate(g):
        if i == 1:
            cancel.set()
    assert g.trace.finish["reason"] == "cancelled"
    assert len(g.trace.tokens) <= 3


@pytest.fixture
def serve() -> Iterator:
    servers: list[RawServer] = []

    def start(script) -> RawServer:
        s = RawServer(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()
