"""transformers backend without the network and without the embedded model: a name that would
need a download is a clear local error (with every socket refused), and a GGUF LoRA goes onto a
model's weights exactly (a tiny random llama, so no model file is needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from thoughtform.backends.base import BackendError  # noqa: E402
from thoughtform.backends.transformers import (  # noqa: E402
    _unpermute_rows,
    apply_gguf_lora,
    load_model,
)
from thoughtform.train import export as E  # noqa: E402

# Runs in a fresh interpreter with the hub's offline switches unset and its endpoint on a
# loopback port nothing listens on; every connect and name lookup is recorded and refused.
_PROBE = r"""
import json, socket, sys, time
attempts = []
def refuse(kind):
    def f(*a, **k):
        attempts.append([kind, repr(a[1:] if kind == "connect" else a[:2])[:120]])
        raise OSError(101, "network unreachable (test)")
    return f
socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect")
socket.getaddrinfo = refuse("getaddrinfo")
socket.create_connection = refuse("create_connection")
from thoughtform.backends import create_backend
from thoughtform.backends.base import BackendError
out = {}
for name in sys.argv[1:]:
    t0 = time.monotonic()
    try:
        create_backend("transformers", model=name)
        out[name] = {"error": None}
    except BackendError as e:
        out[name] = {"error": str(e)}
    out[name]["s"] = round(time.monotonic() - t0, 2)
print(json.dumps({"results": out, "attempts": attempts}))
"""


def test_a_name_that_needs_a_download_is_a_local_error_with_the_network_unreachable(
    tmp_path: Path,
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",  # discard port: nothing answers there
        HF_HOME=str(tmp_path / "hf"),  # an empty cache: nothing is cached
        THOUGHTFORM_CACHE=str(tmp_path / "tf"),
    )
    names = ["HuggingFaceTB/SmolLM2-135M-Instruct", "no-such-org/no-such-model"]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a hang (retries against the endpoint) fails here instead of stalling CI
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        assert got["results"][name]["error"] == (
            f"model {name} is not a local path or a cached model; thoughtform never downloads"
        )
    # Not one connection or name lookup was even tried.
    assert got["attempts"] == []


def test_offline_error_in_process_too() -> None:
    with pytest.raises(BackendError, match="thoughtform never downloads"):
        load_model("no-such-org/no-such-model-xyz")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unpermute_undoes_llamacpp_permutation() -> None:
    rng = np.random.default_rng(0)
    for heads, rows in ((1, 8), (3, 24), (9, 576)):
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        p = E.permute_rows(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(_unpermute_rows(p, heads), w)
    with pytest.raises(BackendError):
        _unpermute_rows(np.zeros((6, 2)), 2)


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    """A random 2-layer llama (4 heads, 2 KV heads) saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    return {"model": model, "dir": tmp_path / "base", "tmp": tmp_path}


def _peft_tensors(model: Any, r: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.model.layers):
        for part, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ):
            for n in names:
                w = getattr(getattr(layer, part), n).weight
                pre = f"base_model.model.model.layers.{i}.{part}.{n}"
                out[f"{pre}.lora_A.weight"] = rng.standard_normal((r, w.shape[1])).astype("f4")
                out[f"{pre}.lora_B.weight"] = rng.standard_normal((w.shape[0], r)).astype("f4")
    return out


def test_gguf_lora_lands_on_the_weights_exactly(tiny: dict[str, Any]) -> None:
    model, r, alpha = tiny["model"], 4, 8.0
    tensors = _peft_tensors(model, r)
    path = E.export_tensors(
        {"lora_alpha": alpha, "r": r},
        tensors,
        tiny["tmp"] / "a.gguf",
        base=tiny["dir"],
        dtype="f32",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert apply_gguf_lora(model, path) == 2 * 7
    scale = alpha / r
    for i in range(2):
        for part, n in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "down_proj")):
            key = f"model.layers.{i}.{part}.{n}.weight"
            pre = f"base_model.model.model.layers.{i}.{part}.{n}"
            want = before[key] + scale * torch.from_numpy(
                tensors[f"{pre}.lora_B.weight"] @ tensors[f"{pre}.lora_A.weight"]
            )
            got = dict(model.named_parameters())[key].detach()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Untouched: what the adapter does not name.
    torch.testing.assert_close(
        model.model.embed_tokens.weight.detach(), before["model.embed_tokens.weight"]
    )


def test_gguf_lora_for_another_model_is_refused(tiny: dict[str, Any]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tensors = _peft_tensors(tiny["model"], 2)
    path = E.export_tensors(
        {"lora_alpha": 4.0, "r": 2}, tensors, tiny["tmp"] / "b.gguf", base=tiny["dir"], dtype="f32"
    )
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(BackendError, match="another model"):
        apply_gguf_lora(other, path)
    (tiny["tmp"] / "junk.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(BackendError, match="GGUF LoRA"):
        apply_gguf_lora(tiny["model"], tiny["tmp"] / "junk.gguf")
