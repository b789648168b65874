"""Apply control vectors to a llama.cpp context through llama-cpp-python's low-level API."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from .cvec import ControlVector, cvec_buffer


def set_cvec(
    ctx: Any, vectors: Sequence[tuple[ControlVector, float]], n_embd: int, n_layer: int
) -> tuple[int, int]:
    """Set the sum of ``vectors`` (each x its scale) on ``ctx``, or clear it when none is left.

    ``ctx`` is a ``llama_context_p`` (``Llama._ctx.ctx``). llama.cpp copies the buffer into its
    own tensors, so nothing here must outlive the call. The vector changes the activations of
    tokens decoded from now on; tokens already in the KV cache keep theirs. Returns the layer
    range set, ``(-1, -1)`` when cleared.
    """
    import llama_cpp

    buf, il_start, il_end = cvec_buffer(vectors, n_embd, n_layer)
    if il_start < 0:
        rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)
    else:
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(ctx, ptr, buf.size, n_embd, il_start, il_end)
    if rc != 0:
        raise RuntimeError(f"llama_set_adapter_cvec failed ({rc}) for layers {il_start}-{il_end}")
    return il_start, il_end


def clear_cvec(ctx: Any, n_embd: int) -> None:
    """Remove any control vector from ``ctx`` (``data=NULL``); later tokens decode unsteered."""
    import llama_cpp

    rc = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)
    if rc != 0:
        raise RuntimeError(f"llama_set_adapter_cvec(NULL) failed ({rc})")
