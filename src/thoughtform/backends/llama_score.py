"""Who-speaks-next scoring for the llama.cpp decode loop: markers as a prefix tree decoded in one
batch, on the reply's own context or on a side context that scores while the reply decodes on.

Measured on the project's 2-core machine (SmolLM2-135M Q4_1, one decode thread): the seed voices'
14-token marker batch takes ~82 ms on the reply's context (two threads; the reply waits), ~90 ms
on a one-thread side context while the reply decodes on the other core (at the same speed within
7% in 8 of 10 alternating stretches; in 2 the host slowed both): scored on the side, a boundary
costs the reply the copy of the cache cells the side lacks (~0.4 ms for 20 new tokens, 2.6 ms
for a 400-token prompt the first time).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import logits as L
from .base import BackendError

Item = tuple[int, int, "int | Sequence[int]", bool]  # (token, position, seq or seqs, logits?)
_U8P = ctypes.POINTER(ctypes.c_uint8)


def fill_batch(b: Any, items: Sequence[Item]) -> None:
    """Write ``items`` into llama.cpp batch ``b`` (a token may belong to several sequences: a
    prefix they share is decoded once)."""
    for i, (tok, pos, seq, want) in enumerate(items):
        b.token[i] = tok
        b.pos[i] = pos
        if isinstance(seq, int):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
        else:
            b.n_seq_id[i] = len(seq)
            for k, q in enumerate(seq):
                b.seq_id[i][k] = q
        b.logits[i] = want
    b.n_tokens = len(items)


def logits_row(c: Any, ctx: Any, row_type: Any, i: int) -> np.ndarray:
    """A view of output row ``i``'s logits in ``ctx`` (valid until its next decode)."""
    ptr = c.llama_get_logits_ith(ctx, i)
    addr = ctypes.cast(ptr, ctypes.c_void_p).value
    if not addr:
        raise BackendError(f"llama.cpp has no logits for output row {i}")
    return np.frombuffer(memoryview(row_type.from_address(addr)), dtype=np.float32)


def marker_tree(
    group: Sequence[Sequence[int]], n_past: int
) -> tuple[dict[tuple[int, ...], int], list[tuple[int, int, list[int], bool]]]:
    """The batch that scores every sequence of ``group`` (the j-th on llama.cpp sequence j+1,
    a copy of sequence 0 whose length is ``n_past``): one item per distinct proper prefix, so
    the "[" every marker starts with is decoded once (21 -> 14 tokens for the seed voices).
    Returns the item index of each prefix path, and the items."""
    node: dict[tuple[int, ...], int] = {}
    items: list[tuple[int, int, list[int], bool]] = []
    for j, s in enumerate(group):
        for t in range(len(s) - 1):
            key = tuple(s[: t + 1])
            k = node.get(key)
            if k is None:
                node[key] = len(items)
                items.append((s[t], n_past + t, [j + 1], True))
            else:
                items[k][2].append(j + 1)
    return node, items


def tree_logprobs(
    group: Sequence[Sequence[int]],
    node: dict[tuple[int, ...], int],
    row: Callable[[int], np.ndarray],
) -> tuple[list[float], dict[int, tuple[np.ndarray, float]]]:
    """Each sequence's log-probability after its first token, read from the decoded batch's
    rows (``row(i)``: item i's logits); also each row used, with its log-partition."""
    rows: dict[int, tuple[np.ndarray, float]] = {}
    out: list[float] = []
    for s in group:
        lp = 0.0
        for t in range(len(s) - 1):
            r = node[tuple(s[: t + 1])]
            got = rows.get(r)
            if got is None:
                x = row(r)
                got = (x, L.log_partition(x))
                rows[r] = got
            lp += float(got[0][s[t + 1]]) - got[1]
        out.append(lp)
    return out, rows


def make_context(
    c: Any,
    model: Any,
    n_ctx: int,
    n_seq_max: int,
    n_batch: int,
    threads: int,
    threads_batch: int,
    lora: Any = None,
) -> Any:
    """A llama.cpp context on ``model`` for the decode loop or the side scorer, with the runtime
    LoRA adapter ``lora`` (a loaded adapter or None) applied; raises BackendError.

    One cache is shared by all sequences (``kv_unified``): markers and branches copy the
    reply's prefix instead of each sequence getting n_ctx / n_seq_max cells of its own."""
    params = c.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.kv_unified = True
    params.n_threads = threads
    params.n_threads_batch = threads_batch
    params.no_perf = True
    # Flash attention stays at llama.cpp's "auto" (on here), although llama-cpp-python's Llama
    # turns it off. Measured context against context on the same weights, interleaved: off, one
    # token decodes 3-5% faster once the context holds ~350 tokens (even at ~100), but a batch
    # of four sequences after a 500-token prefix takes 146 ms against 94 (the loom's children,
    # the marker scoring), and bench branch's 4-vs-1 went 4.3x -> 6.2x.
    ctx = c.llama_init_from_model(model, params)
    if not ctx:
        raise BackendError(f"cannot create a llama.cpp context (n_ctx {n_ctx})")
    if lora is not None:
        adapters = (c.llama_adapter_lora_p_ctypes * 1)(lora)
        scales = (ctypes.c_float * 1)(1.0)
        if c.llama_set_adapters_lora(ctx, adapters, 1, scales):
            c.llama_free(ctx)
            raise BackendError("cannot apply the LoRA adapter to a llama.cpp context")
    return ctx


CvecArgs = tuple[np.ndarray | None, int, int]  # (buffer or None: off, first layer, last layer)


def apply_cvec(c: Any, ctx: Any, n_embd: int, args: CvecArgs) -> None:
    """Put a control-vector buffer (from :func:`..vectors.cvec.cvec_buffer`) into ``ctx``."""
    buf, il_start, il_end = args
    if buf is None or buf.size == 0:
        c.llama_set_adapter_cvec(ctx, None, 0, n_embd, 0, 0)
        return
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    rc = c.llama_set_adapter_cvec(ctx, ptr, buf.size, n_embd, il_start, il_end)
    if rc != 0:
        raise BackendError(f"llama_set_adapter_cvec failed ({rc})")


def _yield_to_the_reply() -> None:
    """Run the calling thread (the side's) at the lowest priority: where it shares a core with
    the reply's decode or the consumer (a busy machine), they go first and the scores come
    later. Linux nice values are per thread; elsewhere nothing changes. Measured: 12
    interleaved pairs on the shared 2-core machine, steer vs plain median 1.07 niced, 1.02 not
    (single runs moved +-20% with the host)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class SideScorer:
    """A second llama.cpp context on the same weights, one thread of its own, that scores
    who-speaks-next while the reply goes on decoding.

    Its sequence 0 mirrors the reply's: at each boundary only the cells it lacks are copied
    over (llama.cpp's sequence state, cut to the new positions through a scratch sequence), on
    the caller's thread while the reply's context is idle; the scoring batch then runs on the
    side thread. Jobs run in order, one at a time."""

    def __init__(
        self,
        c: Any,
        model: Any,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        row_type: Any,
        n_embd: int,
        lora: Any = None,
    ) -> None:
        self._c = c
        self._ctx = make_context(
            c, model, n_ctx, n_seq_max, n_batch, threads=1, threads_batch=1, lora=lora
        )
        self._mem = c.llama_get_memory(self._ctx)
        self._batch = c.llama_batch_init(n_batch, 0, n_seq_max)
        self._n_batch = n_batch
        self._per = n_seq_max - 2  # sequence 0 mirrors the reply; the last is scratch
        self._scratch = n_seq_max - 1
        self._row_type = row_type
        self._n_embd = n_embd
        self.mirrored = 0  # reply cells the side holds (as of the last job submitted)
        self._cvec_key: Any = ()
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llama-score", initializer=_yield_to_the_reply
        )

    def sync(self, main_ctx: Any, main_mem: Any, valid: int, n_past: int) -> tuple[int, Any]:
        """Take the reply's cells from position ``valid`` (those before are the side's already)
        to ``n_past`` out of ``main_ctx``; call while nothing decodes there. Returns what the
        side's next job applies first."""
        c = self._c
        start = min(self.mirrored, valid)
        self.mirrored = n_past
        if start >= n_past:
            return start, None
        s = self._scratch
        c.llama_memory_seq_rm(main_mem, s, -1, -1)
        c.llama_memory_seq_cp(main_mem, 0, s, start, n_past)
        try:
            size = c.llama_state_seq_get_size(main_ctx, s)
            buf = np.empty(size, dtype=np.uint8)
            got = c.llama_state_seq_get_data(main_ctx, buf.ctypes.data_as(_U8P), size, s)
        finally:
            c.llama_memory_seq_rm(main_mem, s, -1, -1)
        if got != size:
            self.mirrored = 0
            raise BackendError("cannot copy the reply's cache to the scoring context")
        return start, buf

    def submit(
        self,
        cells: tuple[int, Any],
        n_past: int,
        seqs: Sequence[Sequence[int]],
        first: Sequence[float],
        cvec: tuple[Any, CvecArgs],
    ) -> Future[list[float]]:
        """Score ``seqs`` (their first tokens' log-probabilities ``first`` known) after the
        reply's first ``n_past`` tokens, on the side thread."""
        return self._pool.submit(self._score, cells, n_past, [list(s) for s in seqs], first, cvec)

    def _score(
        self,
        cells: tuple[int, Any],
        n_past: int,
        seqs: list[list[int]],
        first: Sequence[float],
        cvec: tuple[Any, CvecArgs],
    ) -> list[float]:
        c = self._c
        start, buf = cells
        c.llama_memory_seq_rm(self._mem, 0, start, -1)
        if buf is not None:
            s = self._scratch
            got = c.llama_state_seq_set_data(self._ctx, buf.ctypes.data_as(_U8P), buf.size, s)
            if got != buf.size:
                c.llama_memory_clear(self._mem, True)
                raise BackendError("the scoring context could not take the reply's cache")
            c.llama_memory_seq_cp(self._mem, s, 0, -1, -1)
            c.llama_memory_seq_rm(self._mem, s, -1, -1)
        if cvec[0] != self._cvec_key:
            apply_cvec(c, self._ctx, self._n_embd, cvec[1])
            self._cvec_key = cvec[0]
        out = list(first)
        multi = [(i, s) for i, s in enumerate(seqs) if len(s) > 1]
        for a in range(0, len(multi), self._per):
            part = multi[a : a + self._per]
            group = [s for _, s in part]
            node, items = marker_tree(group, n_past)
            if len(items) > self._n_batch:
                raise BackendError("markers too long to score in one batch")
            for j in range(len(group)):
                c.llama_memory_seq_cp(self._mem, 0, j + 1, -1, -1)
            try:
                fill_batch(self._batch, items)
                rc = c.llama_decode(self._ctx, self._batch)
                if rc != 0:
                    raise BackendError(f"llama_decode returned {rc} (scoring context)")
                lps, _ = tree_logprobs(
                    group, node, lambda r: logits_row(c, self._ctx, self._row_type, r)
                )
            finally:
                for j in range(len(group)):
                    c.llama_memory_seq_rm(self._mem, j + 1, -1, -1)
            for (i, _), lp in zip(part, lps, strict=True):
                out[i] += lp
        return out

    def close(self) -> None:
        """Wait for the job in hand, then free the context."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        c = self._c
        if getattr(self, "_batch", None) is not None:
            c.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            c.llama_free(self._ctx)
            self._ctx = None
