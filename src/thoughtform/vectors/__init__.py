"""Voice vectors: one steering direction per voice, in llama.cpp's control-vector format.

``train`` makes them from a voices dataset (transformers), :mod:`.export` writes
``DIR/<Voice>.gguf`` + ``DIR/vectors.json``, :func:`load_control_vector` / :func:`cvec_buffer`
/ :func:`set_cvec` apply them in llama.cpp, :class:`VectorHooks` in transformers.
"""

from __future__ import annotations

from .cvec import (
    ControlVector,
    VectorFileError,
    cvec_buffer,
    load_control_vector,
    write_control_vector,
)
from .hooks import VectorHooks
from .llama import clear_cvec, set_cvec
from .sets import VectorSet, load_vector_set, seed_vectors_dir, shipped_dir, shipped_sets

__all__ = [
    "ControlVector",
    "VectorFileError",
    "VectorHooks",
    "VectorSet",
    "clear_cvec",
    "cvec_buffer",
    "load_control_vector",
    "load_vector_set",
    "seed_vectors_dir",
    "set_cvec",
    "shipped_dir",
    "shipped_sets",
    "write_control_vector",
]
