"""transformers backend on the real embedded SmolLM2 GGUF: telemetry checked against direct
forward passes, the safetensors cache, unicode, cancellation, stop strings, locking."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from thoughtform.backends import create_backend
from thoughtform.backends.base import (
    FinishEvent,
    GenerationRequest,
    Message,
    Sampling,
    TokenEvent,
    alt_text,
)
from thoughtform.backends.transformers import TransformersBackend
from thoughtform.generate import Generation
from thoughtform.trace import AttentionSummary, load_trace

pytestmark = pytest.mark.model

N_LAYERS = 30  # SmolLM2-135M


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("tf-cache")
    yield d
    shutil.rmtree(d, ignore_errors=True)  # ~0.5 GB of float32 weights


@pytest.fixture(scope="module")
def backend(cache_dir: Path) -> Iterator[TransformersBackend]:
    # One thread: on a few shared cores OpenMP spinning makes more threads ~10x slower.
    be = TransformersBackend(cache_dir=cache_dir, threads=1, attention=True)
    yield be
    be.close()


def chat(text: str, n: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("user", text),), sampling=Sampling(temperature=0, max_tokens=n), **kw
    )


def run(be: TransformersBackend, req: GenerationRequest) -> tuple[list[TokenEvent], FinishEvent]:
    evs = list(be.stream(req))
    fin = evs[-1]
    assert isinstance(fin, FinishEvent)
    toks = [e for e in evs[:-1] if isinstance(e, TokenEvent)]
    assert len(toks) == len(evs) - 1
    return toks, fin


def test_first_load_converts_gguf_and_writes_cache(
    backend: TransformersBackend, cache_dir: Path
) -> None:
    assert backend.loaded.source == "gguf"
    assert backend.model_name.endswith(".gguf")
    d = backend.loaded.cache_path
    assert d is not None and d.parent == cache_dir
    for name in ("model.safetensors", "config.json", "tokenizer.json", "thoughtform-cache.json"):
        assert (d / name).is_file(), name
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    caps = backend.capabilities
    assert caps.exact_entropy and caps.attention and caps.logit_lens and caps.chat
    assert backend.n_layers == N_LAYERS


def test_second_load_uses_safetensors_cache(backend: TransformersBackend, cache_dir: Path) -> None:
    import torch

    t0 = time.perf_counter()
    be2 = create_backend("transformers", cache_dir=cache_dir, threads=1, attention=False)
    wall = time.perf_counter() - t0
    try:
        assert isinstance(be2, TransformersBackend)
        assert be2.loaded.source == "cache"
        assert wall < 5.0
        assert be2.loaded.load_s < backend.loaded.load_s / 3
        ids = torch.tensor([backend.encode_prompt(chat("Hi there", 1))])
        with torch.inference_mode():
            a = backend.model(input_ids=ids).logits[0, -1]
            b = be2.model(input_ids=ids).logits[0, -1]
        assert torch.allclose(a, b, atol=1e-4)  # same weights, eager vs SDPA
    finally:
        be2.close()


def test_greedy_telemetry_through_the_pipeline(
    backend: TransformersBackend, tmp_path: Path
) -> None:
    req = chat("What is the capital of France?", 16, alternatives=5)
    gen = Generation(backend, req, voices="plain", trace_path=tmp_path / "t.jsonl")
    trace = gen.run()
    assert trace.finish is not None and trace.finish["reason"] in ("stop", "length")
    toks = trace.tokens
    assert 0 < len(toks) <= 16
    assert "Paris" in trace.text
    for t in toks:
        assert t.logprob is not None and t.logprob <= 0
        assert len(t.top) == 5
        assert t.top[0].token_id == t.token_id  # greedy picks the top-1 alternative
        assert t.top[0].logprob == pytest.approx(t.logprob)
        lps = [a.logprob for a in t.top]
        assert lps == sorted(lps, reverse=True)
        assert t.entropy is not None and 0 <= t.entropy <= math.log(49152)
        assert t.bytes == backend.token_bytes(t.token_id)
        for a in t.top:
            assert a.bytes == backend.token_bytes(a.token_id) and a.text == alt_text(a.bytes)
    back = load_trace(tmp_path / "t.jsonl")
    assert [t.token_id for t in back.tokens] == [t.token_id for t in toks]


def test_first_token_matches_a_direct_forward_pass(backend: TransformersBackend) -> None:
    import torch

    req = chat("Name a colour.", 1, alternatives=8)
    toks, _ = run(backend, req)
    ids = torch.tensor([backend.encode_prompt(req)])
    with torch.inference_mode():
        logits = backend.model(input_ids=ids).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1)
    entropy = float(-(logp.exp() * logp).sum())
    t = toks[0]
    assert t.token_id == int(torch.argmax(logits))
    assert t.entropy == pytest.approx(entropy, abs=2e-3)
    assert t.logprob == pytest.approx(float(logp[t.token_id]), abs=1e-3)
    assert [a.token_id for a in t.top] == torch.topk(logp, 8).indices.tolist()


def test_attention_summaries_match_a_full_forward(backend: TransformersBackend) -> None:
    import torch

    no_eos = dict.fromkeys(backend.eos_token_ids, -math.inf)  # exactly 40 tokens
    req = chat("Count from one to twenty in words.", 40, attention=True, logit_bias=no_eos)
    toks, fin = run(backend, req)
    p = fin.usage["prompt_tokens"]
    assert p == backend.prompt_tokens == len(backend.encode_prompt(req))
    assert len(toks) == 40
    for i, t in enumerate(toks):
        a = t.attention
        assert a is not None
        assert len(a.prompt_mass) == len(a.segment_mass) == len(a.top) == N_LAYERS
        for layer in range(N_LAYERS):
            total = a.prompt_mass[layer] + sum(m for _, m in a.segment_mass[layer])
            assert total == pytest.approx(1.0, abs=5e-3)
            pos = [q for q, _ in a.top[layer]]
            ws = [w for _, w in a.top[layer]]
            assert len(pos) == 8 and len(set(pos)) == 8
            assert all(0 <= q < p + i for q in pos)  # only earlier positions
            assert ws == sorted(ws, reverse=True)
            assert {s for s, _ in a.segment_mass[layer]} <= {j // 32 for j in range(i)}
        if i == 0:
            assert all(m == [] for m in a.segment_mass)
            assert a.prompt_mass == pytest.approx([1.0] * N_LAYERS, abs=1e-4)
        assert (
            AttentionSummary.from_dict(json.loads(json.dumps(a.to_dict()))).top[0][0][0]
            == (a.top[0][0][0])
        )
    assert any(s == 1 for s, _ in toks[-1].attention.segment_mass[5])  # type: ignore[union-attr]

    # Golden: the last token's summary equals the row of a full (non-cached) forward pass.
    i = len(toks) - 1
    ids = backend.encode_prompt(req) + [t.token_id for t in toks[:i]]
    with torch.inference_mode():
        out = backend.model(input_ids=torch.tensor([ids]), output_attentions=True)
    rows = torch.stack([x[0, :, -1, :] for x in out.attentions]).float().mean(1)
    a = toks[i].attention
    assert a is not None
    assert a.prompt_mass == pytest.approx(rows[:, :p].sum(1).tolist(), abs=1e-4)
    gen = rows[:, p:]
    for layer in (0, 15, 29):
        want = {0: float(gen[layer, :32].sum()), 1: float(gen[layer, 32:].sum())}
        got = dict(a.segment_mass[layer])
        for s, m in want.items():
            assert got.get(s, 0.0) == pytest.approx(m, abs=1e-4)
        assert [q for q, _ in a.top[layer]] == torch.topk(rows[layer], 8).indices.tolist()


def test_custom_segment_buckets(backend: TransformersBackend) -> None:
    backend.segment_of = lambda j: 10 + j % 3
    try:
        toks, _ = run(backend, chat("Tell me a fact about cats.", 8, attention=True))
    finally:
        backend.segment_of = None
    last = toks[-1].attention
    assert last is not None
    segs = {s for layer in last.segment_mass for s, _ in layer}
    assert segs and segs <= {10, 11, 12}


def test_logit_lens_matches_hidden_states(backend: TransformersBackend) -> None:
    import torch

    req = chat("Say something short.", 4, logit_lens=True)
    toks, _ = run(backend, req)
    for t in toks:
        assert t.lens is not None and len(t.lens) == N_LAYERS
        assert t.lens[-1] == alt_text(backend.token_bytes(t.token_id))  # type: ignore[arg-type]
    ids = torch.tensor([backend.encode_prompt(req)])
    m = backend.model
    with torch.inference_mode():
        hs = m(input_ids=ids, output_hidden_states=True).hidden_states
        want = [
            int(m.lm_head(m.model.norm(h[0, -1])).argmax()) for h in hs[1:N_LAYERS]
        ]  # hs[N_LAYERS] is already normed
    assert list(toks[0].lens or [])[:-1] == [alt_text(backend.token_bytes(i)) for i in want]


def test_token_bytes_cover_cyrillic_and_emoji(backend: TransformersBackend) -> None:
    text = "Привет, мир! 👋🏽 Ünïcödé 猫"
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [backend.token_bytes(i) for i in ids]
    assert b"".join(chunks) == text.encode()
    assert any(c.decode("utf-8", "ignore").encode() != c for c in chunks)  # some split chars


def test_generated_unicode_roundtrips(backend: TransformersBackend) -> None:
    toks, _ = run(backend, chat("Say hello in Russian and add an emoji.", 30))
    text = "".join(t.text for t in toks)
    ids = [t.token_id for t in toks]
    assert text == b"".join(t.bytes or b"" for t in toks).decode("utf-8", "replace")
    assert text == backend.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert any(ord(c) > 127 for c in text)
    assert "\ufffd" not in text


def test_cancel_mid_stream_keeps_tokens(backend: TransformersBackend) -> None:
    cancel = threading.Event()
    got: list[TokenEvent] = []
    fin = None
    for ev in backend.stream(chat("Write a poem about the sea.", 50), cancel):
        if isinstance(ev, FinishEvent):
            fin = ev
            break
        got.append(ev)
        if len(got) == 3:
            cancel.set()
    assert fin is not None and fin.reason == "cancelled"
    assert len(got) == 3 == fin.usage["completion_tokens"]


def test_closing_the_generator_frees_the_model(backend: TransformersBackend) -> None:
    g = backend.stream(chat("Write a poem about the sea.", 50))
    next(g)
    next(g)
    g.close()
    assert backend._lock.acquire(blocking=False)
    backend._lock.release()
    toks, fin = run(backend, chat("Hi", 2))
    assert len(toks) == 2 and fin.reason == "length"


def test_raw_prompt_completion(backend: TransformersBackend) -> None:
    prompt = "The capital of France is"
    req = GenerationRequest(prompt=prompt, sampling=Sampling(temperature=0, max_tokens=8))
    toks, fin = run(backend, req)
    assert fin.reason == "length" and len(toks) == 8
    assert "Paris" in "".join(t.text for t in toks)
    assert fin.usage["prompt_tokens"] == len(backend.tokenizer(prompt)["input_ids"])


def test_stop_string_cuts_the_reply(backend: TransformersBackend) -> None:
    base = GenerationRequest(prompt="The capital of France is", sampling=Sampling(0, max_tokens=12))
    full = "".join(t.text for t in run(backend, base)[0])
    k = len(full) // 2
    stop = full[k : k + 3]
    cut = full[: full.index(stop)]
    req = GenerationRequest(prompt=base.prompt, sampling=Sampling(0, max_tokens=12, stop=(stop,)))
    toks, fin = run(backend, req)
    assert fin.reason == "stop"
    assert "".join(t.text for t in toks) == cut


def test_seeded_sampling_is_reproducible(backend: TransformersBackend) -> None:
    def ids(seed: int) -> list[int | None]:
        s = Sampling(temperature=1.0, top_p=0.95, top_k=40, seed=seed, max_tokens=10)
        req = GenerationRequest(messages=(Message("user", "Invent a word."),), sampling=s)
        return [t.token_id for t in run(backend, req)[0]]

    assert ids(123) == ids(123)


def test_logit_bias_bans_a_token(backend: TransformersBackend) -> None:
    first = run(backend, chat("What is the capital of France?", 1))[0][0]
    assert first.token_id is not None
    req = chat("What is the capital of France?", 1, logit_bias={first.token_id: -math.inf})
    t = run(backend, req)[0][0]
    assert t.token_id != first.token_id
    # The telemetry is the model's own distribution (one meaning on every backend): the banned
    # token is still its favourite there; the step is marked steered, with the sampled logprob.
    assert t.top[0].token_id == first.token_id
    assert t.token_id in [a.token_id for a in t.top]
    assert t.steered and t.steered_logprob is not None


def test_concurrent_streams_do_not_interleave(backend: TransformersBackend) -> None:
    req = chat("List three fruits.", 6)
    ref = [t.token_id for t in run(backend, req)[0]]
    results: list[list[int | None]] = []

    def worker() -> None:
        results.append([t.token_id for t in run(backend, req)[0]])

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert results == [ref, ref]


def test_exception_mid_stream_ends_with_error_and_keeps_tokens(
    backend: TransformersBackend,
) -> None:
    def boom(j: int) -> int:
        if j >= 3:
            raise RuntimeError("segment map broke")
        return 0

    backend.segment_of = boom
    try:
        toks, fin = run(backend, chat("Write a poem about the sea.", 20, attention=True))
    finally:
        backend.segment_of = None
    assert fin.reason == "error" and "segment map broke" in fin.message
    assert len(toks) == 4  # tokens 0..3 were generated before step 4 failed


def test_prompt_longer_than_context_is_an_error(backend: TransformersBackend) -> None:
    req = GenerationRequest(prompt="word " * 9000, sampling=Sampling(0, max_tokens=2))
    toks, fin = run(backend, req)
    assert toks == [] and fin.reason == "error" and "context" in fin.message


def test_bench_reports_speed_memory_and_attention_size(
    backend: TransformersBackend, cache_dir: Path
) -> None:
    from thoughtform.backends.transformers import bench_transformers

    # The suite form: each mode in its own process.
    res = bench_transformers(tokens=4, modes=("plain",), threads=1, cache_dir=str(cache_dir))
    r = res["modes"]["plain"]
    assert "error" not in r, r
    assert r["tokens"] == 4 and r["load_source"] == "cache" and r["tok_s"] > 0
    assert r["peak_rss_mb"] >= r["rss_loaded_mb"] > 100
    assert "attention_bytes_per_token" not in r
    # The single-mode form `thoughtform bench backend` runs in its own child process.
    a = bench_transformers(tokens=5, attention=True, threads=1, cache_dir=str(cache_dir))
    assert a["mode"] == "attention" and a["tokens"] == 5 and a["tok_s"] > 0
    # 30 layers x (8 top positions + prompt mass + buckets) in compact JSON.
    assert 2000 < a["attention_bytes_per_token"] < 8000
    assert a["attention_mem_bytes_per_token"] > a["attention_bytes_per_token"]


def test_bfloat16_with_full_telemetry(backend: TransformersBackend, cache_dir: Path) -> None:
    be = TransformersBackend(cache_dir=cache_dir, dtype="bfloat16", threads=1)
    try:
        assert be.loaded.source == "cache"
        assert str(next(be.model.parameters()).dtype) == "torch.bfloat16"
        toks, fin = run(be, chat("Hi!", 3, attention=True, logit_lens=True))
        assert fin.reason in ("stop", "length") and toks
        for t in toks:
            assert t.logprob is not None and t.logprob <= 0 and t.entropy is not None
            assert t.lens is not None and len(t.lens) == N_LAYERS
            assert t.attention is not None and len(t.attention.top) == N_LAYERS
    finally:
        be.close()


def test_pipeline_summarises_attention_per_voice_segment(backend: TransformersBackend) -> None:
    """Through Generation, attention mass is bucketed by the reply's own voice segments and
    top positions map back to reply tokens via prompt_tokens."""
    from thoughtform.backends import Message, Sampling

    req = GenerationRequest(
        messages=(
            Message("system", "Answer as [Echo] then [Doubt], each on its own line."),
            Message("user", "Is the sea blue?"),
        ),
        sampling=Sampling(temperature=0.0, max_tokens=24, seed=1),
        attention=True,
    )
    gen = Generation(backend, req, voices="seed")
    trace = gen.run()
    n_segs = len(trace.segments)
    assert n_segs >= 1
    prompt = trace.finish["usage"]["prompt_tokens"]  # type: ignore[index]
    for t in trace.tokens[1:]:
        att = t.attention
        assert att is not None and att.prompt_tokens == prompt
        for layer in att.segment_mass:
            assert all(0 <= si < n_segs for si, _ in layer)
        for layer, pm in zip(att.segment_mass, att.prompt_mass, strict=True):
            # Prompt mass plus per-segment mass covers the whole row (tiny buckets dropped).
            assert pm + sum(m for _, m in layer) == pytest.approx(1.0, abs=0.01)
        for layer in att.top:
            for pos, _ in layer:
                ri = att.reply_index(pos)
                assert ri is None or ri < t.index  # only earlier reply tokens
    # Each token's own segment index agrees with the segment whose token range holds it.
    for t in trace.tokens:
        si = gen.segment_of(t.index)
        seg = trace.segments[si]
        assert seg.tokens and seg.tokens[0] <= t.index <= seg.tokens[-1]


def _kl(p: Any, q: Any) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_embedded_voices_is_the_adapter_llamacpp_runs(
    backend: TransformersBackend, cache_dir: Path
) -> None:
    """``embedded-voices``: the shipped GGUF LoRA on the embedded model's weights. Its next-token
    distributions match llama.cpp running the same base with the same adapter file, as closely
    as the Q4_1/8-bit-activation noise allows (see test_export), and are far from the plain
    model's; it speaks in voices; attention is summarised per voice segment."""
    import numpy as np
    import torch

    llama_cpp = pytest.importorskip("llama_cpp")
    from thoughtform.adapters import voices_adapter_path
    from thoughtform.models import embedded_gguf_path

    voices = TransformersBackend("embedded-voices", cache_dir=cache_dir, threads=1)
    try:
        assert voices.model_name == "embedded-voices"
        assert voices.loaded.info["lora_matrices"] == 30 * 7
        assert voices.loaded.info["base_source"] == "cache"  # the module's cache, no reconversion
        req = chat("Tell me about the sea.", 24, alternatives=0)
        toks, fin = run(voices, req)
        assert fin.reason in ("stop", "length") and toks
        text = "".join(t.text for t in toks)
        assert text.lstrip().startswith("[")  # a voice marker, unlike the plain model
        ids = voices.encode_prompt(req)
        gen = [t.token_id for t in toks if t.token_id is not None]
        with torch.no_grad():
            seq = torch.tensor([ids + gen])
            lp = torch.log_softmax(
                voices.model(seq).logits[0, len(ids) - 1 : len(ids) + len(gen) - 1].double(), -1
            )
        kl = {}
        for name, lora in (("adapter", voices_adapter_path()), ("none", None)):
            llm = llama_cpp.Llama(
                model_path=str(embedded_gguf_path()),
                lora_path=str(lora) if lora else None,
                n_ctx=256,
                n_threads=1,
                logits_all=True,
                verbose=False,
            )
            try:
                llm.reset()
                llm.eval(ids + gen)
                scores = np.array(llm.scores[len(ids) - 1 : len(ids) + len(gen) - 1])
                kl[name] = _kl(lp, torch.log_softmax(torch.tensor(scores, dtype=torch.float64), -1))
            finally:
                llm.close()
        # Measured here: 0.004 nats with the adapter, 3.9 without it.
        assert kl["adapter"] < 0.02 and kl["none"] > 30 * kl["adapter"], kl
        # The voices model is the one whose attention per voice is worth seeing.
        att_req = chat("Is the sea blue?", 16, attention=True, logit_lens=True)
        g = Generation(voices, att_req, voices="seed")
        trace = g.run()
        assert any(s.voice != "main" for s in trace.segments)
        assert all(t.attention is not None for t in trace.tokens[1:])
        assert all(t.lens is not None and len(t.lens) == N_LAYERS for t in trace.tokens)
    finally:
        voices.close()


def test_embedded_is_the_plain_embedded_gguf(backend: TransformersBackend, cache_dir: Path) -> None:
    from thoughtform.backends.transformers import load_model
    from thoughtform.models import embedded_gguf_path

    got = load_model("embedded", cache_dir=cache_dir)
    assert got.name == embedded_gguf_path().name and got.source == "cache"
    w = backend.model.model.layers[3].self_attn.q_proj.weight
    assert bool((got.model.model.layers[3].self_attn.q_proj.weight == w).all())
