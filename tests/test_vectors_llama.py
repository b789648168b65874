"""The exported voice vectors in llama.cpp itself: a shipped vector set through llama-cpp-python's
low-level ``llama_set_adapter_cvec`` on the embedded model changes the logits, more at strength 2
than at 0.5, and clearing it restores them bit for bit."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import llama_cpp

from thoughtform.models import embedded_gguf_path
from thoughtform.vectors.cvec import ControlVector, cvec_buffer, load_control_vector
from thoughtform.vectors.llama import clear_cvec, set_cvec
from thoughtform.vectors.sets import shipped_dir

pytestmark = pytest.mark.model
PROMPT = b"[Doubt]\nIs the sea really blue, or"


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    m = llama_cpp.Llama(
        model_path=str(embedded_gguf_path()),
        n_ctx=128,
        n_batch=64,
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    yield m
    m.close()


def shape(llm: Any) -> tuple[int, int]:
    return llm.n_embd(), int(llama_cpp.llama_model_n_layer(llm.model))


def last_logits(llm: Any) -> np.ndarray:
    toks = llm.tokenize(PROMPT, add_bos=False, special=False)
    llm.reset()
    llm.eval(toks)
    return np.array(llm.scores[len(toks) - 1], dtype=np.float32)


def test_shipped_vector_moves_llama_cpp_logits_and_clears_exactly(llm: Any) -> None:
    n_embd, n_layer = shape(llm)
    assert (n_embd, n_layer) == (576, 30)
    doubt = load_control_vector(shipped_dir("seed") / "Doubt.gguf")
    ctx = llm._ctx.ctx
    base = last_logits(llm)
    assert np.array_equal(base, last_logits(llm))  # the comparison is not noisy
    lo, hi = set_cvec(ctx, [(doubt, 0.5)], n_embd, n_layer)
    assert (lo, hi) == (doubt.layers[0], doubt.layers[-1])
    half = last_logits(llm)
    set_cvec(ctx, [(doubt, 2.0)], n_embd, n_layer)
    double = last_logits(llm)
    clear_cvec(ctx, n_embd)
    cleared = last_logits(llm)
    d_half = float(np.abs(half - base).max())
    d_double = float(np.abs(double - base).max())
    assert d_half > 1e-3 and d_double > 2 * d_half, (d_half, d_double)
    assert np.array_equal(cleared, base)
    # An empty set clears too.
    set_cvec(ctx, [(doubt, 1.0)], n_embd, n_layer)
    assert set_cvec(ctx, [], n_embd, n_layer) == (-1, -1)
    assert np.array_equal(last_logits(llm), base)


def test_buffer_offsets_are_llama_cpp_layers(llm: Any) -> None:
    """A direction at layer L, placed by cvec_buffer, moves the logits when llama.cpp's layer
    range is exactly L and not when it is L - 1 or L + 1: the offsets are llama.cpp's layers."""
    n_embd, n_layer = shape(llm)
    ctx = llm._ctx.ctx
    base = last_logits(llm)
    d = np.random.default_rng(0).standard_normal(n_embd).astype(np.float32) * 4
    for layer in (1, 12, n_layer - 1):
        buf, lo, hi = cvec_buffer([(ControlVector({layer: d}), 1.0)], n_embd, n_layer)
        assert (lo, hi) == (layer, layer)
        moved = []
        for il in (layer - 1, layer, layer + 1):
            if not 1 <= il < n_layer:
                continue
            # A longer buffer of zeros, so that ranges past the vector's layer are readable.
            full = np.zeros(n_embd * (n_layer - 1), np.float32)
            full[: buf.size] = buf
            ptr = full.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            assert llama_cpp.llama_set_adapter_cvec(ctx, ptr, full.size, n_embd, il, il) == 0
            moved.append((il, not np.array_equal(last_logits(llm), base)))
        clear_cvec(ctx, n_embd)
        assert [il for il, m in moved if m] == [layer], moved


def test_vector_is_added_to_the_residual_stream_at_its_scale(llm: Any) -> None:
    """At a huge strength on the last block the residual is the vector itself, so the output
    norm's result is w * u * sqrt(n_embd): the expected amount, from the model file alone."""
    import gguf

    n_embd, n_layer = shape(llm)
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    w = next(np.array(t.data, np.float32) for t in reader.tensors if t.name == "output_norm.weight")
    u = np.random.default_rng(1).standard_normal(n_embd).astype(np.float32)
    u /= np.linalg.norm(u)
    ctx = llm._ctx.ctx
    toks = llm.tokenize(PROMPT, add_bos=False, special=False)

    def final_norm_out() -> np.ndarray:
        llama_cpp.llama_set_embeddings(ctx, True)
        try:
            llm.reset()
            llm.eval(toks)
            ptr = llama_cpp.llama_get_embeddings_ith(ctx, len(toks) - 1)
            return np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()
        finally:
            llama_cpp.llama_set_embeddings(ctx, False)

    base = final_norm_out()
    want = w * u * np.sqrt(n_embd)
    set_cvec(ctx, [(ControlVector({n_layer - 1: u}), 1e5)], n_embd, n_layer)
    got = final_norm_out()
    clear_cvec(ctx, n_embd)
    # The model's own residual (norm ~1e2 here) is what is left: under 1% of the result.
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01
    assert np.linalg.norm(base - want) / np.linalg.norm(want) > 0.5
    assert np.array_equal(final_norm_out(), base)
    with pytest.raises(ValueError, match=r"layer 30 outside 1\.\.29"):
        set_cvec(ctx, [(ControlVector({30: u}), 1.0)], n_embd, n_layer)
