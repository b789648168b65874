"""The merged embedded-voices model: same replies as the runtime LoRA, built once, cached by hash.

Sizes, measured (6 chat prompts, no system prompt, x 48 greedy tokens of the runtime-LoRA model,
teacher-forced): mean per-token KL(runtime LoRA || merged Q8_0) is 0.005 nats (per prompt at most
0.006) and the top token agrees at 96% of positions, while the base model without the adapter is
at 3.09 nats and a Q4_1 merge (which rounds the adapter away) at 2.73. The bound below, 0.05, is
10x the measured value and 50x below "adapter lost". Greedy prefixes agree for 5-29 tokens, and
are not asserted: where two voices' names are near a tie, any rounding may flip the choice.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from thoughtform.adapters import merged as M  # noqa: E402
from thoughtform.adapters import voices_adapter_path  # noqa: E402
from thoughtform.models import EMBEDDED_VOICES, embedded_gguf_path, resolve_llama_model  # noqa: E402

pytestmark = pytest.mark.model

PROMPTS = (
    "What should I do about a friend who keeps cancelling plans?",
    "Explain why the sky is blue.",
    "Write a haiku about rain.",
)
N_TOKENS = 32
MAX_MEAN_KL = 0.05
MIN_TOP1 = 0.85  # measured 0.958


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private THOUGHTFORM_CACHE; the merge lives in its ``merged`` folder, as in use."""
    return tmp_path_factory.mktemp("tfcache")


@pytest.fixture(scope="module")
def built(root: Path) -> Path:
    """The shipped adapter merged into the embedded model (one build for the whole module)."""
    path = M.merged_model(embedded_gguf_path(), voices_adapter_path(), root / M.CACHE_SUBDIR)
    assert path is not None and path.is_file()
    return path


@pytest.fixture(scope="module")
def small_adapter(root: Path) -> Path:
    """A different adapter: the shipped one on layer 0 only (quick to merge: one layer to
    dequantize, the other tensors go to llama.cpp's quantizer as they are)."""
    src = M.read_gguf(voices_adapter_path())
    out = root / "layer0.gguf"
    w = gguf.GGUFWriter(str(out), arch="llama")
    for key, vtype, sub, val in src.kv:
        if key != "general.architecture":
            sub_type = None if sub is None else gguf.GGUFValueType(sub)
            w.add_key_value(key, val, gguf.GGUFValueType(vtype), sub_type)
    for t in src.tensors:
        if t.name.startswith("blk.0."):
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _chat(llm: Any, user: str) -> list[int]:
    # No system prompt: the voices model is used (and was trained) without one.
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return list(llm.tokenize(text.encode(), add_bos=False, special=True))


def _walk(llm: Any, ids: list[int], reply: list[int] | None = None) -> tuple[list[int], Any]:
    """Next-token log-probabilities along a reply: ``reply`` teacher-forced, or (None) the
    greedy reply of ``llm`` itself, N_TOKENS long or up to end of text. Only the reply's rows
    are computed (logits for the whole prompt would cost 300 x 49152-wide output products)."""
    llm.reset()
    llm.eval(ids)
    toks: list[int] = []
    rows = []
    while len(toks) < (N_TOKENS if reply is None else len(reply)):
        s = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        s -= s.max()
        rows.append(s - np.log(np.exp(s).sum()))
        tok = int(s.argmax()) if reply is None else reply[len(toks)]
        if reply is None and tok == llm.token_eos():
            break
        toks.append(tok)
        llm.eval([tok])
    return toks, np.array(rows[: len(toks)])


def test_merged_model_agrees_with_runtime_lora(built: Path) -> None:
    """Teacher-forced on the runtime-LoRA model's greedy replies, the merged model's next-token
    distributions stay within the KL bound, and its top token agrees almost everywhere."""
    from llama_cpp import Llama

    def load(**kw: Any) -> Any:
        return Llama(n_ctx=512, n_threads=2, verbose=False, seed=0, **kw)

    ref = load(model_path=str(embedded_gguf_path()), lora_path=str(voices_adapter_path()))
    cases = []
    for p in PROMPTS:
        ids = _chat(ref, p)
        cases.append((ids, *_walk(ref, ids)))
    ref.close()
    merged = load(model_path=str(built))
    kls, agree = [], []
    for ids, reply, lr in cases:
        _, lm = _walk(merged, ids, reply)
        kls.append(float((np.exp(lr) * (lr - lm)).sum(axis=1).mean()))
        agree.append(float((lm.argmax(axis=1) == lr.argmax(axis=1)).mean()))
    merged.close()
    assert all(len(c[1]) >= 8 for c in cases)  # replies long enough to mean something
    assert max(kls) < MAX_MEAN_KL, kls
    assert np.mean(agree) >= MIN_TOP1, agree


def test_merged_weights_are_base_plus_scaled_delta(built: Path) -> None:
    """One adapted tensor of the cached file is exactly Q8_0(f16(W + alpha/r * B @ A))."""
    from gguf.quants import dequantize, quantize

    name = "blk.3.attn_q.weight"
    base = {t.name: t for t in M.read_gguf(embedded_gguf_path()).tensors}[name]
    lora = M.read_gguf(voices_adapter_path())
    tensors = {t.name: t.data for t in lora.tensors}
    a = np.asarray(tensors[f"{name}.lora_a"], np.float32)
    b = np.asarray(tensors[f"{name}.lora_b"], np.float32)
    assert M.lora_scale(lora, a.shape[0]) == 16.0 / 8  # the shipped adapter: alpha 16, r 8
    want = dequantize(base.data, gguf.GGMLQuantizationType(base.type)) + 2.0 * (b @ a)
    got = {t.name: t for t in M.read_gguf(built).tensors}[name]
    assert got.type == gguf.GGMLQuantizationType.Q8_0
    expect = quantize(want.astype(np.float16).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    # gguf-py's Q8_0 is a port of llama.cpp's reference quantizer; the bytes match but for a
    # rare float rounding tie (the product's summation order differs between BLAS and einsum).
    assert np.mean(np.asarray(got.data) != expect) < 1e-4


def test_cache_is_reused(built: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call returns the same file without rebuilding it; the voices model resolves to
    it, and THOUGHTFORM_NO_MERGE restores the runtime LoRA."""
    before = built.stat()
    side = built.with_name(built.name + ".json").read_text()
    again = M.merged_model(embedded_gguf_path(), voices_adapter_path(), root / M.CACHE_SUBDIR)
    assert again == built
    after = built.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert built.with_name(built.name + ".json").read_text() == side

    monkeypatch.setenv("THOUGHTFORM_CACHE", str(root))
    monkeypatch.delenv(M.NO_MERGE_ENV, raising=False)
    assert M.merged_voices_model(build=False) == built
    assert resolve_llama_model(EMBEDDED_VOICES) == (built, None)
    monkeypatch.setenv(M.NO_MERGE_ENV, "1")
    assert M.merged_voices_model() is None
    assert resolve_llama_model(EMBEDDED_VOICES) == (embedded_gguf_path(), voices_adapter_path())


def test_changed_adapter_gets_its_own_file(built: Path, root: Path, small_adapter: Path) -> None:
    """Another adapter (another hash) is merged into a new file; the first one stays."""
    cache = root / M.CACHE_SUBDIR
    assert M.merged_model(embedded_gguf_path(), small_adapter, cache, build=False) is None
    other = M.merged_model(embedded_gguf_path(), small_adapter, cache)
    assert other is not None and other != built and built.is_file()
    assert len(M.read_gguf(other).tensors) == len(M.read_gguf(built).tensors)


def test_damaged_cache_file_is_rebuilt(root: Path, small_adapter: Path) -> None:
    """Bytes overwritten in the cached file: it no longer counts as built, and the next call
    rebuilds it, byte-identical to the first build."""
    cache = root / M.CACHE_SUBDIR
    path = M.merged_model(embedded_gguf_path(), small_adapter, cache)
    assert path is not None
    good = _sha(path)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    assert M.merged_model(embedded_gguf_path(), small_adapter, cache, build=False) is None
    assert M.merged_model(embedded_gguf_path(), small_adapter, cache) == path
    assert _sha(path) == good
    # A copy of the whole file with a new mtime is still the same bytes: kept, not rebuilt.
    shutil.copy(path, path.with_suffix(".bak"))
    path.with_suffix(".bak").replace(path)
    assert M.merged_model(embedded_gguf_path(), small_adapter, cache, build=False) == path


def test_failed_build_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A merge that cannot be built (here: an adapter for another architecture) says so in one
    stderr line and yields None, leaving no file behind; the voices model then resolves to
    base + runtime LoRA."""
    bad = tmp_path / "voices-seed.gguf"
    w = gguf.GGUFWriter(str(bad), arch="gpt2")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 576), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setenv("THOUGHTFORM_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv(M.NO_MERGE_ENV, raising=False)
    monkeypatch.setattr(M, "voices_adapter_path", lambda: bad)
    assert M.merged_voices_model() is None
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failed = [line for line in err.splitlines() if "using the runtime LoRA" in line]
    assert len(failed) == 1 and "architecture" in failed[0], err
    assert resolve_llama_model(EMBEDDED_VOICES) == (embedded_gguf_path(), voices_adapter_path())
    left = sorted(p.name for p in (tmp_path / "c" / M.CACHE_SUBDIR).iterdir())
    assert left == [".build.lock", "digests.json"]  # no temporary or half-built model
