"""GGUF LoRA export: layout, llama's q/k permutation, and llama.cpp agreeing with transformers+peft.

llama.cpp runs the Q4_1 base with 8-bit quantized activations while transformers runs the
dequantized float32 weights, so logits differ by a little noise even without any adapter
(KL ~0.003-0.01 nats per token here). The checks below are sized to that: the exported adapter
must be as close as that noise, and far closer than a missing adapter or a missing permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gguf")

from thoughtform.train import export as E  # noqa: E402

pytestmark = pytest.mark.model

N_TOKENS = 32
PROMPTS = (
    "Tell me about the sea.",
    "Is it worth learning the violin at forty?",
    "I keep putting off calling my sister. Why?",
    "Write a short poem about a lighthouse.",
)
NEAR_TIE = 0.3  # nats between transformers' top two tokens: llama.cpp's noise may flip these


@pytest.fixture(scope="module")
def loaded() -> Any:
    from thoughtform.backends.transformers import load_model

    torch.set_num_threads(2)
    return load_model(None, dtype="float32")


@pytest.fixture(scope="module")
def adapter(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A rank-4 LoRA on every projection with random non-zero B (a strong, known delta)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(
        loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=list(E.TENSOR_NAMES))
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.25)
    pm.eval()
    d = tmp_path_factory.mktemp("lora")
    pm.save_pretrained(d / "peft")
    ok = E.export_lora(d / "peft", d / "ok.gguf", base="embedded", dtype="f32")
    return {"model": pm, "dir": d, "gguf": ok}


def test_permutation_matches_the_gguf(loaded: Any) -> None:
    """permute_rows maps transformers' q/k weights exactly onto the GGUF's (dequantized) ones."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from thoughtform.models import embedded_gguf_path

    tensors = {t.name: t for t in GGUFReader(embedded_gguf_path()).tensors}
    layers = loaded.model.model.layers if hasattr(loaded.model, "model") else None
    assert layers is not None
    for i in (0, 17):
        attn = layers[i].self_attn
        for name, hf, heads in (("attn_q", attn.q_proj, 9), ("attn_k", attn.k_proj, 3)):
            t = tensors[f"blk.{i}.{name}.weight"]
            g = dequantize(t.data, t.tensor_type)
            w = getattr(hf, "base_layer", hf).weight.detach().numpy()
            assert not np.allclose(g, w)  # the layouts really differ...
            np.testing.assert_array_equal(g, E.permute_rows(w, heads))  # ...by exactly this
        t = tensors[f"blk.{i}.attn_v.weight"]
        v = getattr(attn.v_proj, "base_layer", attn.v_proj).weight.detach().numpy()
        np.testing.assert_array_equal(dequantize(t.data, t.tensor_type), v)


def test_permute_rows_small() -> None:
    w = np.arange(8)[:, None] * np.ones((1, 2))
    # One head of 8 rows: halves [0 1 2 3 | 4 5 6 7] interleave to [0 4 1 5 2 6 3 7].
    assert E.permute_rows(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(E.ExportError):
        E.permute_rows(np.zeros((6, 2)), 2)


def test_gguf_layout(adapter: dict[str, Any]) -> None:
    from safetensors.numpy import load_file

    meta, arrays = E.read_lora_gguf(adapter["gguf"])
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    assert len(arrays) == 30 * 7 * 2
    peft = load_file(str(adapter["dir"] / "peft" / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.5."
    a_q = peft[pre + "self_attn.q_proj.lora_A.weight"]
    b_q = peft[pre + "self_attn.q_proj.lora_B.weight"]
    b_k = peft[pre + "self_attn.k_proj.lora_B.weight"]
    b_v = peft[pre + "self_attn.v_proj.lora_B.weight"]
    assert arrays["blk.5.attn_q.weight.lora_a"].shape == (4, 576)
    assert arrays["blk.5.attn_k.weight.lora_b"].shape == (192, 4)
    assert arrays["blk.5.ffn_down.weight.lora_a"].shape == (4, 1536)
    np.testing.assert_array_equal(arrays["blk.5.attn_q.weight.lora_a"], a_q)
    np.testing.assert_array_equal(arrays["blk.5.attn_q.weight.lora_b"], E.permute_rows(b_q, 9))
    np.testing.assert_array_equal(arrays["blk.5.attn_k.weight.lora_b"], E.permute_rows(b_k, 3))
    np.testing.assert_array_equal(arrays["blk.5.attn_v.weight.lora_b"], b_v)


def test_export_rejects_what_llamacpp_cannot_express(tmp_path: Path) -> None:
    info = E.BaseInfo("llama", 9, 3)
    with pytest.raises(E.ExportError, match="rsLoRA"):
        E.lora_tensors({"use_rslora": True}, {}, info)
    with pytest.raises(E.ExportError, match="unsupported adapter tensor"):
        E.lora_tensors({}, {"base_model.model.lm_head.weight": np.zeros((2, 2))}, info)
    with pytest.raises(E.ExportError, match="not a peft adapter"):
        E.export_lora(tmp_path, tmp_path / "x.gguf")


def _hf_greedy(pm: Any, tok: Any, prompt: str) -> tuple[list[int], list[int], Any]:
    """Prompt ids, transformers+peft greedy tokens, and log-probs at those positions."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = pm.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=N_TOKENS,
            min_new_tokens=N_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        seq = out[0].tolist()
        logits = pm(torch.tensor([seq])).logits[0, len(ids) - 1 : len(seq) - 1]
    return ids, seq[len(ids) :], torch.log_softmax(logits.double(), -1)


def _llama(lora: Path | None) -> Any:
    from llama_cpp import Llama

    from thoughtform.models import embedded_gguf_path

    return Llama(
        model_path=str(embedded_gguf_path()),
        lora_path=str(lora) if lora else None,
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )


def _llama_logprobs(llm: Any, ids: list[int], gen: list[int]) -> Any:
    llm.reset()
    llm.eval(ids + gen)
    scores = np.array(llm.scores[len(ids) - 1 : len(ids) + len(gen) - 1])
    return torch.log_softmax(torch.tensor(scores, dtype=torch.float64), -1)


def _llama_greedy(llm: Any, ids: list[int]) -> list[int]:
    llm.reset()
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(t))
        if len(out) == N_TOKENS:
            break
    return out


def _kl(p: Any, q: Any) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def hf_runs(adapter: dict[str, Any], loaded: Any) -> dict[str, Any]:
    """transformers+peft greedy continuations of PROMPTS, with their log-probs."""
    return {p: _hf_greedy(adapter["model"], loaded.tokenizer, p) for p in PROMPTS}


def test_llamacpp_with_exported_adapter_matches_peft(
    adapter: dict[str, Any], hf_runs: dict[str, Any]
) -> None:
    pytest.importorskip("llama_cpp")
    d = adapter["dir"]
    # The same adapter exported without llama's q/k permutation: must be clearly worse.
    E.PERMUTED_ARCHS.discard("llama")
    try:
        noperm = E.export_lora(d / "peft", d / "noperm.gguf", dtype="f32")
    finally:
        E.PERMUTED_ARCHS.add("llama")
    hf = hf_runs
    kl: dict[str, list[float]] = {"ok": [], "noperm": [], "none": []}
    exact, report = 0, []
    for name, path in (("ok", adapter["gguf"]), ("noperm", noperm), ("none", None)):
        llm = _llama(path)
        try:
            for p in PROMPTS:
                ids, gen, lp = hf[p]
                kl[name].append(_kl(lp, _llama_logprobs(llm, ids, gen)))
                if name != "ok":
                    continue
                got = _llama_greedy(llm, ids)
                k = next(
                    (i for i, (a, b) in enumerate(zip(gen, got, strict=True)) if a != b), N_TOKENS
                )
                top2 = torch.topk(lp, 2).values
                margin = float(top2[k, 0] - top2[k, 1]) if k < N_TOKENS else None
                report.append((p, k, margin))
                if k == N_TOKENS:
                    exact += 1
                else:
                    # A divergence is only acceptable where transformers itself nearly tied.
                    assert margin is not None and margin < NEAR_TIE, report
        finally:
            llm.close()
    print("KL per prompt:", kl, "greedy agreement:", report)
    ok, bad, none = (float(np.mean(kl[k])) for k in ("ok", "noperm", "none"))
    # As close as the quantization noise; a wrong permutation or no adapter is far off.
    assert ok < 0.02, kl
    assert bad > 10 * ok and none > 30 * ok, kl
    assert exact >= len(PROMPTS) - 1, report


def test_merged_gguf_matches_peft(adapter: dict[str, Any], hf_runs: dict[str, Any]) -> None:
    """Base + adapter merged into one f16 GGUF: llama.cpp loads it and agrees with peft."""
    pytest.importorskip("llama_cpp")
    merged = E.merge_lora(adapter["dir"] / "peft", adapter["dir"] / "merged.gguf", dtype="f16")
    from llama_cpp import Llama

    llm = Llama(model_path=str(merged), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        kls = [_kl(lp, _llama_logprobs(llm, ids, gen)) for ids, gen, lp in hf_runs.values()]
        assert llm.metadata.get("tokenizer.chat_template")  # metadata came along
    finally:
        llm.close()
    merged.unlink()
    assert float(np.mean(kls)) < 0.02, kls
