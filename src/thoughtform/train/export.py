"""A peft LoRA adapter to a llama.cpp GGUF LoRA (``Llama(lora_path=...)`` loads it).

llama.cpp stores llama's q/k projection rows in its own rotary layout (its converter permutes
them); transformers un-permutes them when it reads a GGUF. A LoRA delta ``W = B @ A`` is in
transformers' layout, so the same row permutation goes onto ``B`` of q and k.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# peft module name -> llama.cpp tensor name (inside ``blk.N.``).
TENSOR_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
# Architectures whose q/k rows llama.cpp's converter permutes (LlamaModel and its subclasses).
PERMUTED_ARCHS = {"llama"}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class ExportError(ValueError):
    """The adapter or the base model cannot be expressed as a llama.cpp GGUF LoRA."""


@dataclass(frozen=True)
class BaseInfo:
    """What the exporter needs to know about the base model."""

    arch: str
    n_head: int
    n_head_kv: int


def base_info(base: str | Path | None) -> BaseInfo:
    """Architecture and head counts of a base model: a GGUF file or an HF directory."""
    from ..models import resolve_model

    where = resolve_model(None if base in (None, "embedded") else str(base))
    p = Path(where)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from gguf import GGUFReader

        fields = GGUFReader(p).fields

        def get(key: str) -> Any:
            f = fields.get(key)
            if f is None:
                raise ExportError(f"{p}: GGUF has no {key}")
            return f.contents()

        arch = str(get("general.architecture"))
        return BaseInfo(
            arch,
            int(get(f"{arch}.attention.head_count")),
            int(get(f"{arch}.attention.head_count_kv")),
        )
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{where}: neither a GGUF file nor a model directory with config.json")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    n_head = int(cfg["num_attention_heads"])
    return BaseInfo(
        str(cfg.get("model_type", "llama")), n_head, int(cfg.get("num_key_value_heads") or n_head)
    )


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row permutation (``convert_hf_to_gguf.LlamaModel.permute``): within each
    head, rows ``[x0, x1, ..., y0, y1, ...]`` become ``[x0, y0, x1, y1, ...]``."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"cannot permute {rows} rows into {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _adapter_files(adapter: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    d = Path(adapter)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ExportError(
            f"{d}: not a peft adapter (needs adapter_config.json and adapter_model.safetensors)"
        )
    return json.loads(cfg_path.read_text(encoding="utf-8")), load_file(str(weights))


def lora_tensors(
    cfg: dict[str, Any], tensors: dict[str, np.ndarray], info: BaseInfo
) -> dict[str, np.ndarray]:
    """llama.cpp-named ``lora_a``/``lora_b`` arrays (float32) from a peft state dict."""
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ExportError("rsLoRA/DoRA adapters are not supported (plain LoRA only)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ExportError("per-module rank/alpha patterns are not supported (one alpha per file)")
    out: dict[str, np.ndarray] = {}
    permute = info.arch in PERMUTED_ARCHS
    for key, arr in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise ExportError(f"unsupported adapter tensor {key!r} (only LoRA on linear layers)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in TENSOR_NAMES:
            raise ExportError(f"no llama.cpp tensor for module {module!r} ({key})")
        a = np.asarray(arr, dtype=np.float32)
        if ab == "B" and permute and module in ("q_proj", "k_proj"):
            a = permute_rows(a, info.n_head if module == "q_proj" else info.n_head_kv)
        # peft shapes A (r, in) and B (out, r) are what llama.cpp expects: GGUF stores the
        # dimensions reversed, so ne = (in, r) and (r, out).
        out[f"blk.{layer}.{TENSOR_NAMES[module]}.weight.lora_{ab.lower()}"] = np.ascontiguousarray(
            a
        )
    for name in out:
        if name.endswith("lora_a") and name[:-1] + "b" not in out:
            raise ExportError(f"{name}: no matching lora_b")
    return out


def export_lora(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = "embedded",
    dtype: str = "f16",
) -> Path:
    """Write the peft adapter directory ``adapter`` as a GGUF LoRA at ``out``; return ``out``."""
    cfg, tensors = _adapter_files(adapter)
    return export_tensors(cfg, tensors, out, base, dtype)


def export_tensors(
    cfg: dict[str, Any],
    tensors: dict[str, np.ndarray],
    out: str | Path,
    base: str | Path | None = "embedded",
    dtype: str = "f16",
) -> Path:
    """Write peft-named LoRA tensors with their adapter config (``lora_alpha``...) as a GGUF LoRA;
    also takes a training checkpoint's tensors (names with ``.default``)."""
    import gguf

    if dtype not in ("f16", "f32"):
        raise ExportError(f"dtype must be f16 or f32, got {dtype!r}")
    info = base_info(base)
    arrays = lora_tensors(cfg, tensors, info)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch=info.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    w.add_name("thoughtform LoRA")
    np_dtype = np.float16 if dtype == "f16" else np.float32
    for name in sorted(arrays, key=_tensor_order):
        w.add_tensor(name, arrays[name].astype(np_dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def merge_lora(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = "embedded",
    dtype: str = "f16",
) -> Path:
    """Write base GGUF + adapter merged into one model GGUF: adapted weights dequantized, merged
    (``W + alpha/r * B @ A``) and stored as ``dtype``; all other tensors and metadata copied."""
    import gguf
    from gguf.quants import dequantize

    from ..models import resolve_model

    if dtype not in ("f16", "f32"):
        raise ExportError(f"dtype must be f16 or f32, got {dtype!r}")
    src = Path(resolve_model(None if base in (None, "embedded") else str(base)))
    if not (src.is_file() and src.suffix.lower() == ".gguf"):
        raise ExportError(f"{src}: merging needs a GGUF base model")
    cfg, tensors = _adapter_files(adapter)
    info = base_info(src)
    arrays = lora_tensors(cfg, tensors, info)
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    reader = gguf.GGUFReader(src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch=info.arch)
    for key, f in reader.fields.items():
        # The writer adds the architecture itself; the file type no longer holds (mixed types).
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    for t in reader.tensors:
        a = arrays.get(f"{t.name}.lora_a")
        if a is None:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        weight = dequantize(t.data, t.tensor_type).astype(np.float32)
        weight += scale * (arrays[f"{t.name}.lora_b"] @ a)
        w.add_tensor(t.name, weight.astype(np_dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def _tensor_order(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


def read_lora_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and float32 tensors of a GGUF LoRA (for checks and tests)."""
    from gguf import GGUFReader

    r = GGUFReader(Path(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arrays = {
        t.name: np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        for t in r.tensors
    }
    return meta, arrays
