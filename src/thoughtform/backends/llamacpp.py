"""The embedded default backend: llama.cpp in process, on a decode loop we own.

``Llama.generate()`` hides the step between two tokens, which is where steering happens, and its
own ``logprobs`` need ``logits_all=True`` (a ctx x vocab float array and a Python sort per token).
So this backend drives llama.cpp's low-level API itself: one ``llama_decode`` per token on
sequence 0, the step's logits read once through ``llama_get_logits_ith`` for telemetry (top-k,
exact entropy) and sampling in numpy, the conductor consulted before every token, and who-speaks-
next scored by decoding every voice's marker as a parallel sequence (``llama_memory_seq_cp``) in
one batch. ``Llama`` is kept for loading, tokenizing and the chat template only.
"""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..trace import Alternative
from . import logits as L
from .base import (
    BackendError,
    Capabilities,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    StreamEvent,
    TokenEmitter,
    TokenEvent,
    alt_text,
)
from .llama_score import (
    CvecArgs,
    SideScorer,
    apply_cvec,
    fill_batch,
    make_context,
    marker_tree,
    tree_logprobs,
)

MAX_ALTERNATIVES = 50
N_SEQ_MAX = 16  # sequence 0 is the reply; the rest score markers and sample branches
N_BATCH = 512

# llama.cpp's OpenMP workers spin while waiting; on a busy machine (a browser, a test runner, the
# UI) that collapses 2-core throughput from ~60 to ~1 tok/s, while passive waiting costs little
# when idle. libgomp reads this once, when llama_cpp is first imported: so set it here, before.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_threads() -> int:
    """Threads for token-by-token decoding: all cores but one (at least one).

    Decoding one token is a chain of small matrix-vector products; on this project's 2-core
    machine two threads decode SmolLM2-135M at ~24 tok/s and one thread at ~42 tok/s (the
    threads wait on each other per operation, and the spare core serves the Python side:
    telemetry, parser, UI). Prompt evaluation (batches) still uses every core.
    """
    return max(1, _cores() - 1)


class _Grammar:
    """A llama.cpp GBNF grammar sampler, checked lazily: the sampled token first, the whole
    vocabulary only when it is rejected (what llama.cpp's own common sampler does)."""

    def __init__(self, vocab: Any, text: str) -> None:
        import llama_cpp

        self._c = llama_cpp
        self.smpl = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not self.smpl:
            raise BackendError("invalid GBNF grammar (it does not parse)")
        self._one = (llama_cpp.llama_token_data * 1)()
        self._arr1 = llama_cpp.llama_token_data_array(
            data=self._one, size=1, selected=-1, sorted=False
        )
        self._full: np.ndarray | None = None

    def allows(self, tok: int, logit: float) -> bool:
        """Whether the grammar accepts ``tok`` next."""
        self._one[0].id = tok  # type: ignore[assignment]
        self._one[0].logit = logit
        self._one[0].p = 0.0
        self._arr1.size = 1
        self._arr1.selected = -1
        self._c.llama_sampler_apply(self.smpl, ctypes.byref(self._arr1))
        return bool(np.isfinite(self._one[0].logit))

    def mask(self, x: np.ndarray) -> np.ndarray:
        """``x`` with every token the grammar rejects at -inf."""
        n = x.shape[0]
        if self._full is None or self._full.shape[0] != n:
            self._full = np.zeros(
                n, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)])
            )
        cand = self._full
        cand["id"] = np.arange(n, dtype=np.intc)
        cand["logit"] = x
        cand["p"] = 0.0
        arr = self._c.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(self._c.llama_token_data)),
            size=n,
            selected=-1,
            sorted=False,
        )
        self._c.llama_sampler_apply(self.smpl, ctypes.byref(arr))
        return np.array(cand["logit"], dtype=np.float32)

    def accept(self, tok: int) -> None:
        """Advance the grammar over an emitted token."""
        self._c.llama_sampler_accept(self.smpl, tok)

    def free(self) -> None:
        """Release the sampler."""
        if self.smpl:
            self._c.llama_sampler_free(self.smpl)
            self.smpl = None


class _DecodeThread:
    """One thread that runs ``llama_decode`` on the reply's context and batch when told, so
    that the caller's telemetry and its consumer's work run meanwhile (llama_decode releases
    the GIL). Branching uses it for its children's batches; a single reply no longer does:
    each hand-over wakes an idle core twice (0.49 ms a token on this project's VM), more than
    one reply's per-token work it overlapped (see stream).

    Three plain locks hand over (go, inside, done): the caller fills the batch and
    :meth:`start` returns once this thread is about to enter llama.cpp; :meth:`wait` returns its
    result. Measured against a thread pool (a Future, an Event, a closure per token), one
    llama_decode's return to the next one's start: 724-725 us -> 646-671 us at the median.
    The caller waits until this thread is about to enter llama.cpp because, handed over
    blind, it waited for the GIL while the caller built the step's event and ran the consumer
    (0.8 ms between two decodes)."""

    def __init__(self, c: Any, ctx: Any, batch: Any) -> None:
        self._c = c
        self._ctx = ctx
        self._batch = batch
        self._go = threading.Lock()
        self._inside = threading.Lock()
        self._done = threading.Lock()
        for lock in (self._go, self._inside, self._done):
            lock.acquire()
        self._rc = 0
        self._error: BaseException | None = None
        self._stop = False
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name="llama-decode", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        decode = self._c.llama_decode
        ctx, batch = self._ctx, self._batch
        go, inside, done = self._go, self._inside, self._done
        while True:
            go.acquire()
            if self._stop:
                inside.release()
                return
            inside.release()
            try:
                self._rc = decode(ctx, batch)
            except BaseException as e:  # reported by wait(), on the caller's thread
                self._error = e
            done.release()

    def start(self, items: Sequence[tuple[int, int, int | Sequence[int], bool]]) -> None:
        """Decode ``items`` in one batch on this thread; returns once it is under way."""
        if self.busy:
            raise RuntimeError("a decode is already under way")
        fill_batch(self._batch, items)
        self._rc, self._error = 0, None
        self.busy = True
        self._go.release()
        self._inside.acquire()

    def wait(self) -> None:
        """Wait for the decode :meth:`start` began; raise if it failed."""
        if not self.busy:
            return
        self._done.acquire()
        self.busy = False
        if self._error is not None:
            raise self._error
        if self._rc != 0:
            raise RuntimeError(f"llama_decode returned {self._rc}")

    def close(self) -> None:
        """Finish the decode under way, then end the thread."""
        if not self._thread.is_alive():
            return
        try:
            self.wait()
        except Exception:
            pass
        self._stop = True
        self._go.release()
        self._inside.acquire()
        self._thread.join()


class _Advance:
    """The token the reply appends next, decoded when the loop comes back for its logits (or
    already taken from a scoring batch): :meth:`result` decodes it, records it in ``past`` and
    returns its logits row (None: read the context's last row)."""

    __slots__ = ("_decode", "_past", "_row", "_tok")

    def __init__(
        self,
        tok: int,
        past: list[int],
        decode: Callable[[int, int], None] | None = None,
        row: np.ndarray | None = None,
    ) -> None:
        self._tok, self._past, self._decode, self._row = tok, past, decode, row

    def result(self) -> np.ndarray | None:
        """The logits after the token, once it is in the cache."""
        d, self._decode = self._decode, None
        if d is not None:
            d(self._tok, len(self._past))
            self._past.append(self._tok)
        return self._row


def _settle(jobs: list[Future[list[float]]]) -> None:
    """Wait for the side context's scoring jobs (their faults are read by whoever reads the
    futures: the voice choices they fill)."""
    for f in jobs:
        try:
            f.result()
        except Exception:
            pass
    jobs.clear()


def _plain_step(base: tuple[float, float], top_k: int) -> Any:
    from ..steer import Step

    return Step(temperature=base[0], top_p=base[1], top_k=top_k)


class _Scored:
    """The marker paths a scoring batch left in the cache: for each token path after ``base``
    (sequence 0's length when scored), a sequence holding it and the logits that follow it."""

    __slots__ = ("base", "n_seqs", "rows")

    def __init__(
        self, base: int, rows: dict[tuple[int, ...], tuple[int, np.ndarray]], n: int
    ) -> None:
        self.base = base
        self.rows = rows
        self.n_seqs = n


class LlamaCppBackend:
    """llama.cpp in process (llama-cpp-python); the embedded SmolLM2 GGUF by default."""

    name = "llamacpp"

    def __init__(
        self,
        model: str | Path | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        lora_path: str | Path | None = None,
        seed: int | None = None,
        merged: bool = True,
        side_scoring: bool | None = None,
    ) -> None:
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as e:
            raise BackendError(
                "backend 'llamacpp' needs llama-cpp-python: pip install 'thoughtform[llama]'"
            ) from e
        from ..models import model_display_name, resolve_llama_model

        path, lora = resolve_llama_model(model, lora_path, merged=merged)
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
        if lora is not None and not lora.is_file():
            # llama.cpp does not check: a missing adapter crashes the first decode.
            raise BackendError(f"{lora}: LoRA adapter file not found")
        self.model_path = path
        self.lora_path = lora
        self.model_name = model_display_name(model, path, lora)
        self._c = llama_cpp
        try:
            # Llama loads the model, the tokenizer and the chat template; its own context stays
            # tiny because generation runs on the context made below.
            self._llm = Llama(
                model_path=str(path),
                n_ctx=64,
                n_batch=64,
                n_threads=1,
                lora_path=str(lora) if lora else None,
                seed=seed if seed is not None else 0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"{path}: cannot load model: {e}") from None
        try:
            self._ctx = make_context(
                llama_cpp,
                self._llm._model.model,
                n_ctx,
                N_SEQ_MAX,
                N_BATCH,
                threads=n_threads or decode_threads(),
                threads_batch=n_threads or _cores(),
                lora=self._llm._lora_adapter,
            )
        except BackendError as e:
            self._llm.close()
            raise BackendError(f"{path}: {e}") from None
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, N_SEQ_MAX)
        self._n_ctx = n_ctx
        self._n_vocab = self._llm.n_vocab()
        # One ctypes array type for a logits row: np.ctypeslib.as_array builds a new type per
        # call (66 us a token, measured after a decode).
        self._row_type = ctypes.c_float * self._n_vocab
        # llama_get_logits_ith returning the row's address as an int (see _logits).
        fn_addr = ctypes.cast(llama_cpp.llama_get_logits_ith, ctypes.c_void_p).value
        assert fn_addr is not None
        self._logits_ith = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
            fn_addr
        )
        self._views: dict[int, np.ndarray] = {}
        self._eog: dict[int, bool] = {}
        self._n_embd = llama_cpp.llama_model_n_embd(self._llm._model.model)
        self._n_layer = llama_cpp.llama_model_n_layer(self._llm._model.model)
        self._past: list[int] = []  # tokens in sequence 0's cache
        self._lock = threading.Lock()
        self._piece_cache: dict[int, bytes] = {}
        self._shown: dict[int, tuple[str, bytes]] = {}  # an alternative's text and bytes by id
        self._vocab: Any = None
        self._formatter = self._make_formatter()
        self._eos = self._llm.token_eos()
        self._cvec_key: Any = ()
        self._cvec_args: CvecArgs = (None, 0, 0)
        self._vector_sets: dict[str, Any] = {}
        # Who-speaks-next scoring decodes every marker on its own sequence; the one the reply
        # then writes is taken from there instead of decoded again (see _advance).
        self._spec: _Scored | None = None
        # Branching's batches decode here while the children's telemetry is worked out (see
        # sample_children); a single reply decodes on its own thread (see stream).
        self._decoder = _DecodeThread(llama_cpp, self._ctx, self._batch)
        # Who-speaks-next that only observes (nothing is chosen by it) is scored on a second
        # context, on the core the reply's one-thread decode leaves, while the reply decodes on
        # (llama_score). It mirrors sequence 0 from the lowest position removed since the
        # last copy (_seq0_cut). One core: nothing to overlap with, scored in line.
        self.side_scoring = side_scoring if side_scoring is not None else _cores() >= 2
        self._side: SideScorer | None = None
        self._seq0_cut = 0

    # -- model facts -------------------------------------------------------------------------

    def _make_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        meta = self._llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            return None

        def tok_text(key: str) -> str:
            tid = meta.get(key)
            if tid is None:
                return ""
            return self._llm._model.token_get_text(int(tid))

        return Jinja2ChatFormatter(
            template=template,
            eos_token=tok_text("tokenizer.ggml.eos_token_id"),
            bos_token=tok_text("tokenizer.ggml.bos_token_id"),
        )

    @property
    def capabilities(self) -> Capabilities:
        """Full telemetry and full control: top-k up to 50, exact entropy, logit bias, grammar,
        token-level steering, exact who-speaks-next, voice vectors."""
        return Capabilities(
            logprobs=True,
            max_alternatives=MAX_ALTERNATIVES,
            exact_entropy=True,
            logit_bias=True,
            grammar=True,
            chat=self._formatter is not None,
            completion=True,
            token_control=True,
            voice_scores="exact",
            voice_vectors=True,
            branching=True,
        )

    @property
    def n_embd(self) -> int:
        """Width of the residual stream."""
        return int(self._n_embd)

    @property
    def n_layer(self) -> int:
        """Number of transformer layers."""
        return int(self._n_layer)

    def chat_prompt(self, request: GenerationRequest) -> str:
        """The prompt text the GGUF's chat template makes of the request's messages."""
        if self._formatter is None:
            raise BackendError(f"{self.model_path.name}: the GGUF has no chat template")
        msgs = [{"role": m.role, "content": m.content} for m in request.messages]
        return str(self._formatter(messages=msgs).prompt)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (chat template applied for chat requests)."""
        if request.is_chat:
            text = self.chat_prompt(request)
            return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        return list(self._llm.tokenize((request.prompt or "").encode("utf-8"), special=False))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, no BOS, special tokens not parsed."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def piece(self, tok: int) -> bytes:
        """The bytes of one token."""
        b = self._piece_cache.get(tok)
        if b is None:
            b = self._llm.detokenize([tok])
            self._piece_cache[tok] = b
        return b

    def vocab(self) -> Any:
        """The vocabulary as the conductor needs it (built once: ~0.2 s for 49,152 tokens)."""
        if self._vocab is None:
            from ..steer import Vocab

            n = self._n_vocab
            pieces = [self.piece(i) for i in range(n)]
            v = self._llm._model.vocab
            eog = [i for i in range(n) if self._c.llama_vocab_is_eog(v, i)] or [self._eos]
            self._vocab = Vocab(pieces, eog, self.tokenize)
        return self._vocab

    def _is_eog(self, tok: int) -> bool:
        got = self._eog.get(tok)
        if got is None:  # one ctypes call per distinct token, then a lookup (11 us -> <1 us)
            got = self._eog[tok] = bool(self._c.llama_vocab_is_eog(self._llm._model.vocab, tok))
        return got

    def _grammar_ok(self, text: str) -> bool:
        """Whether llama.cpp parses the GBNF grammar (a grammar that fails to parse would crash
        sampling, so it is checked before use)."""
        try:
            _Grammar(self._llm._model.vocab, text).free()
        except BackendError:
            return False
        return True

    # -- the low-level loop ----------------------------------------------------------------------

    def _decode(self, items: Sequence[tuple[int, int, int | Sequence[int], bool]]) -> None:
        """Decode ``(token, position, seq or seqs, want_logits)`` items in one batch on this
        thread (a token may belong to several sequences: a prefix they share is decoded
        once)."""
        fill_batch(self._batch, items)
        rc = self._c.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int = -1) -> np.ndarray:
        """A view of output row ``i``'s logits (valid until the next decode).

        Measured in the loop: llama-cpp-python's binding, the pointer cast and a new view per
        call cost 85 us a token between two decodes; an address-returning binding and one view
        per address (llama.cpp reuses its output buffer) 33 us."""
        addr = self._logits_ith(self._ctx, i)
        if not addr:
            raise BackendError(f"llama.cpp has no logits for output row {i}")
        view = self._views.get(addr)
        if view is None:
            if len(self._views) >= 64:  # a buffer llama.cpp grew moves every row
                self._views.clear()
            view = self._views[addr] = np.frombuffer(
                memoryview(self._row_type.from_address(addr)), dtype=np.float32
            )
        return view

    def _eval_prompt(self, ids: list[int], fresh: bool) -> None:
        """Bring sequence 0's cache to ``ids`` (reusing the common prefix unless ``fresh``)."""
        keep = 0
        if not fresh:
            for a, b in zip(self._past, ids, strict=False):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(ids) - 1)  # the last prompt token is decoded for its logits
        if keep == 0:
            self._c.llama_memory_clear(self._mem, True)
        else:
            self._c.llama_memory_seq_rm(self._mem, 0, keep, -1)
        self._seq0_cut = min(self._seq0_cut, keep)
        for s in range(1, N_SEQ_MAX):
            self._c.llama_memory_seq_rm(self._mem, s, -1, -1)
        self._spec = None
        self._past = ids[:keep]
        rest = ids[keep:]
        for a in range(0, len(rest), N_BATCH):
            chunk = rest[a : a + N_BATCH]
            last = a + len(chunk) == len(rest)
            self._decode(
                [(t, keep + a + j, 0, last and j == len(chunk) - 1) for j, t in enumerate(chunk)]
            )
        self._past = list(ids)

    def score_sequences(
        self, seqs: Sequence[Sequence[int]], x: np.ndarray, log_z: float, keep: bool = False
    ) -> list[float]:
        """Log-probability of each token sequence continuing sequence 0, whose next-token logits
        are ``x``: first tokens from ``x``, the rest by decoding every sequence in parallel
        (copies of sequence 0's cache) in one batch per ``N_SEQ_MAX - 1`` sequences.

        ``keep`` (the decode loop's boundaries): leave the decoded paths in the cache, with
        their logits, so that the marker the reply goes on to write is not decoded twice."""
        self._drop_spec()
        out = [float(x[s[0]]) - log_z if s else 0.0 for s in seqs]
        multi = [(i, list(s)) for i, s in enumerate(seqs) if len(s) > 1]
        n_past = len(self._past)
        per = N_SEQ_MAX - 1
        keep = keep and 0 < len(multi) <= per
        for a in range(0, len(multi), per):
            group = multi[a : a + per]
            node, items = marker_tree([s for _, s in group], n_past)
            if len(items) > N_BATCH:
                raise BackendError("markers too long to score in one batch")
            for j in range(len(group)):
                self._c.llama_memory_seq_cp(self._mem, 0, j + 1, -1, -1)
            kept = False
            try:
                self._decode(items)
                lps, row_lz = tree_logprobs([s for _, s in group], node, self._logits)
                for (i, _), lp in zip(group, lps, strict=True):
                    out[i] += lp
                if keep:
                    # Copies: the next decode overwrites llama.cpp's logits buffer.
                    rows = {
                        path: (items[r][2][0], np.array(row_lz[r][0], dtype=np.float32))
                        for path, r in node.items()
                    }
                    self._spec = _Scored(n_past, rows, len(group))
                    kept = True
            finally:
                if not kept:
                    for j in range(len(group)):
                        self._c.llama_memory_seq_rm(self._mem, j + 1, -1, -1)
        return out

    def _drop_spec(self) -> None:
        """Free the sequences a kept scoring batch left."""
        sp = self._spec
        if sp is None:
            return
        self._spec = None
        for j in range(1, sp.n_seqs + 1):
            self._c.llama_memory_seq_rm(self._mem, j, -1, -1)

    def _advance(self, tok: int) -> _Advance:
        """Append ``tok`` to sequence 0. When the last scoring batch already decoded it (the
        marker the reply writes next), its cache cell is shared into sequence 0 and the logits
        after it are the result; else it is decoded when the result is asked for (None: read
        them with _logits(-1)).

        Measured: a boundary's batch (14 tokens for the seed voices) costs ~6 single decodes;
        reusing the written marker's 2-3 tokens saves that many decodes per boundary."""
        pos = len(self._past)
        sp = self._spec
        if sp is not None:
            hit = sp.rows.get((*self._past[sp.base :], tok)) if pos >= sp.base else None
            if hit is not None:
                self._c.llama_memory_seq_cp(self._mem, hit[0], 0, pos, pos + 1)
                self._past.append(tok)
                return _Advance(tok, self._past, row=hit[1])
            self._drop_spec()
        return _Advance(tok, self._past, self._decode_next)

    def _decode_next(self, tok: int, pos: int) -> None:
        """Decode the reply's next token at ``pos`` of sequence 0, on this thread."""
        self._decode([(tok, pos, 0, True)])

    def _set_vector(self, spec: tuple[tuple[str, float], ...], conductor: Any) -> None:
        """Put the voice vectors of ``spec`` ((voice, strength) pairs) into the context; one
        buffer upload per change (a voice boundary), nothing per token."""
        if spec == self._cvec_key:
            return
        self._drop_spec()  # decoded under the vectors before
        self._cvec_key = spec
        self._cvec_args = (None, 0, 0)
        if spec:
            from ..vectors.cvec import cvec_buffer
            from ..vectors.sets import load_vector_set

            where = (conductor.plan.vector_dir if conductor is not None else None) or "seed"
            vset = self._vector_sets.get(where)
            if vset is None:
                vset = load_vector_set(where)
                self._vector_sets[where] = vset
            pairs = [(cv, s) for v, s in spec if (cv := vset.get(v)) is not None]
            self._cvec_args = cvec_buffer(pairs, self._n_embd, self._n_layer)
        apply_cvec(self._c, self._ctx, self._n_embd, self._cvec_args)

    def _side_scorer(self) -> SideScorer | None:
        """The side context that scores who-speaks-next off the reply's path (made at the first
        boundary that wants it), or None where there is no core for it or it cannot be made."""
        if self._side is None and self.side_scoring:
            try:
                self._side = SideScorer(
                    self._c,
                    self._llm._model.model,
                    self._n_ctx,
                    N_SEQ_MAX,
                    N_BATCH,
                    self._row_type,
                    self._n_embd,
                    self._llm._lora_adapter,
                )
            except BackendError:
                self.side_scoring = False
        return self._side

    def score_later(
        self, seqs: Sequence[Sequence[int]], x: np.ndarray, log_z: float
    ) -> Future[list[float]] | None:
        """As :meth:`score_sequences` (without ``keep``), but the batch runs on the side
        context while the reply decodes on: returns its future, or None (score now instead).
        Call between two decodes of sequence 0."""
        side = self._side_scorer()
        if side is None:
            return None
        first = [float(x[s[0]]) - log_z if s else 0.0 for s in seqs]
        self._drop_spec()  # frees the scratch sequence the copy goes through
        cells = side.sync(self._ctx, self._mem, self._seq0_cut, len(self._past))
        self._seq0_cut = len(self._past)
        return side.submit(cells, len(self._past), seqs, first, (self._cvec_key, self._cvec_args))

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Generate token by token with top-k, logprob and exact entropy for each step."""
        t0 = time.perf_counter()
        if not self._lock.acquire(timeout=600):
            yield FinishEvent("error", "the model is busy with another generation")
            return
        n = 0
        grammar: _Grammar | None = None
        conductor = request.conductor
        pending: _Advance | None = None  # the token the next step decodes first
        side_jobs: list[Future[list[float]]] = []  # who-speaks-next scored on the side
        try:
            try:
                ids = self.prompt_ids(request)
            except BackendError as e:
                yield FinishEvent("error", str(e))
                return
            if not ids:
                ids = [self._llm.token_bos()]
            prompt_len = len(ids)
            ids = ids + list(request.prefix)
            forced_queue = list(request.forced)
            s = request.sampling
            room = self._n_ctx - len(ids)
            if room <= 0:
                yield FinishEvent("error", f"prompt is {len(ids)} tokens; context is {self._n_ctx}")
                return
            max_new = min(s.max_tokens or room, room)
            k = max(0, min(request.alternatives, MAX_ALTERNATIVES))
            if request.grammar:
                try:
                    grammar = _Grammar(self._llm._model.vocab, request.grammar)
                except BackendError as e:
                    yield FinishEvent("error", str(e))
                    return
            seed = s.seed if s.seed is not None else random.randrange(2**31)
            rng = np.random.default_rng(seed)
            bias_ids = np.array(list(request.logit_bias), dtype=np.intc)
            bias_vals = np.array(list(request.logit_bias.values()), dtype=np.float32)
            if conductor is not None:
                conductor.bind(self.vocab())
            # A seed promises a repeatable reply: evaluate the whole prompt afresh (a cached
            # prefix changes the batch shapes and so the last bits of the logits); unseeded
            # chats reuse the cached prefix.
            # A branch keeps the cache of its prefix whatever the seed: that is its point.
            self._eval_prompt(ids, fresh=s.seed is not None and not request.prefix)
            emitter = TokenEmitter(tuple(s.stop))
            t_first: float | None = None
            reason: FinishReason = "length"
            base = (s.temperature, s.top_p)
            x_next: np.ndarray | None = None
            want = L.ranking_size(k, s.temperature, s.top_k)
            xbuf = np.empty(self._n_vocab, dtype=np.float32)
            ibuf = np.empty(self._n_vocab, dtype=np.intp)  # the scan's candidates
            while True:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if pending is not None:
                    x_next = pending.result()
                    pending = None
                # llama.cpp's own row, read in place: the step is over before the next decode
                # (a scoring batch in line copies it first: see score).
                x = self._logits(-1) if x_next is None else x_next
                held: list[np.ndarray] = [x]
                # The maximum, log-partition, exact entropy and one ranking (the alternatives
                # and the sampler's candidates) in one pass (compiled where built).
                m, log_z, entropy, ranked = L.scan(x, want, ibuf)
                top_ids = ranked[:k] if ranked is not None and k else None

                def score(
                    seqs: Sequence[Sequence[int]],
                    x: np.ndarray = x,
                    log_z: float = log_z,
                    held: list[np.ndarray] = held,
                ) -> list[float]:
                    if held[0] is not xbuf:
                        # The batch overwrites llama.cpp's rows: the step goes on with a copy.
                        np.copyto(xbuf, x)
                        held[0] = xbuf
                    return self.score_sequences(seqs, xbuf, log_z, keep=True)

                def later(
                    seqs: Sequence[Sequence[int]],
                    log_z: float = log_z,
                    held: list[np.ndarray] = held,
                ) -> Future[list[float]] | None:
                    # held: the copy, if a batch in line came first in this step.
                    fut = self.score_later(seqs, held[0], log_z)
                    if fut is not None:
                        side_jobs.append(fut)
                    return fut

                step = (
                    conductor.step(score, later if self.side_scoring else None)
                    if conductor is not None
                    else None
                )
                x = held[0]
                if forced_queue and (step is None or step.force is None):
                    step = step or _plain_step(base, s.top_k)
                    step.force = forced_queue.pop(0)
                if step is not None and step.vector != self._cvec_key:
                    self._set_vector(step.vector, conductor)
                forced = False
                steered = False
                slp: float | None = None
                if step is not None and step.force is not None:
                    tok, forced, steered, slp = step.force, True, True, 0.0
                else:
                    temp, top_p = (step.temperature, step.top_p) if step else base
                    top_k = step.top_k if step else s.top_k
                    xs = x
                    if bias_ids.size or (step is not None and step.ban is not None):
                        xs = x.copy()
                        if bias_ids.size:
                            xs[bias_ids] += bias_vals
                        if step is not None and step.ban is not None:
                            banned = step.ban
                            mass = float(np.exp(x[banned] - log_z).sum())
                            xs[banned] = -np.inf
                            steered = steered or mass > 1e-6
                        steered = steered or bool(bias_ids.size)
                    tok, slp = L.sample(
                        xs,
                        temp,
                        top_p,
                        top_k,
                        rng,
                        ranked=ranked if xs is x else None,
                        m=m if xs is x else None,
                    )
                    if grammar is not None and not grammar.allows(tok, float(xs[tok])):
                        xs = grammar.mask(xs)
                        if not np.isfinite(xs).any():
                            yield FinishEvent("error", "the grammar allows no token here")
                            return
                        tok, slp = L.sample(xs, temp, top_p, top_k, rng)
                        steered = True
                    steered = steered or (temp, top_p) != base
                    if step is not None and step.intercept:
                        tok2, forced = conductor.intercept(  # type: ignore[union-attr]
                            tok, score, later if self.side_scoring else None
                        )
                        if forced:
                            tok, steered, slp = tok2, True, 0.0
                        x = held[0]
                if self._is_eog(tok):
                    reason = "stop"
                    break
                if grammar is not None:
                    grammar.accept(tok)
                if n + 1 < max_new:
                    # Decoded at the next step's start, after its event is handed on (the
                    # consumer's parser and conductor see the token first). On this thread, as
                    # llama-cpp-python does: a decode thread overlapped the event with the
                    # decode, but each hand-over woke an idle core (a halted vCPU here) twice,
                    # measured 0.49 ms a token, more than the work it overlapped.
                    pending = self._advance(tok)
                ev = self._token_event(
                    tok,
                    emitter,
                    x,
                    log_z,
                    entropy,
                    top_ids,
                    steered=steered,
                    steered_logprob=slp if steered else None,
                    forced=forced,
                    vector=step.vector if step is not None else (),
                )
                for out in emitter.push(ev):
                    if t_first is None:
                        t_first = time.perf_counter() - t0
                    yield out
                if emitter.stopped:
                    reason = "stop"
                    break
                n += 1
                if n >= max_new:
                    reason = "length"
                    break
            for out in emitter.flush():
                yield out
            # The trace's voice choices are complete when the reply is.
            _settle(side_jobs)
            timings = {"total_s": time.perf_counter() - t0}
            if t_first is not None:
                timings["first_token_s"] = t_first
            yield FinishEvent(
                reason,
                timings=timings,
                usage={
                    "prompt_tokens": prompt_len,
                    "prefix_tokens": len(request.prefix),
                    "completion_tokens": n,
                },
            )
        except GeneratorExit:
            raise
        except Exception as e:  # keep the partial reply; report the fault as the final event
            yield FinishEvent("error", f"{type(e).__name__}: {e}")
        finally:
            # A pending token is not decoded: _past says the cache lacks it.
            pending = None
            _settle(side_jobs)
            self._drop_spec()
            if grammar is not None:
                grammar.free()
            if self._cvec_key:
                try:
                    self._set_vector((), None)
                except Exception:
                    pass
            self._lock.release()

    def sample_children(
        self,
        request: GenerationRequest,
        n: int,
        seeds: Sequence[int],
        cancel: threading.Event | None = None,
    ) -> list[list[TokenEvent]]:
        """``n`` continuations of ``request.prefix`` (after its ``forced`` tokens), sampled
        together: the prefix is decoded once (or reused from the cache) in sequence 0, copied to
        sequences 1..n-1, and every step decodes one token of every live child in one batch.
        Telemetry per token as in :meth:`stream`; no conductor (a plain continuation each)."""
        if not 1 <= n <= N_SEQ_MAX:
            raise BackendError(f"between 1 and {N_SEQ_MAX} children at once, not {n}")
        with self._lock:
            ids = self.prompt_ids(request) or [self._llm.token_bos()]
            ids = ids + list(request.prefix) + list(request.forced)
            s = request.sampling
            room = self._n_ctx - len(ids)
            if room <= 0:
                raise BackendError(f"prompt is {len(ids)} tokens; context is {self._n_ctx}")
            max_new = min(s.max_tokens or room, room)
            k = max(0, min(request.alternatives, MAX_ALTERNATIVES))
            self._eval_prompt(ids[: len(ids) - len(request.forced)], fresh=False)
            # The forced tokens, once, in sequence 0, with the model's telemetry for each.
            head: list[TokenEvent] = []
            head_emit = TokenEmitter(())
            ibuf = np.empty(self._n_vocab, dtype=np.intp)  # the scan's candidates
            for tok in request.forced:
                x = np.array(self._logits(-1), dtype=np.float32)
                _, log_z, entropy, top_ids = L.scan(x, k, ibuf)
                ev0 = self._token_event(
                    tok,
                    head_emit,
                    x,
                    log_z,
                    entropy,
                    top_ids,
                    steered=True,
                    steered_logprob=0.0,
                    forced=True,
                )
                head.extend(head_emit.push(ev0))
                self._decode([(tok, len(self._past), 0, True)])
                self._past.append(tok)
            head.extend(head_emit.flush())
            for c in range(1, n):
                self._c.llama_memory_seq_rm(self._mem, c, -1, -1)
                self._c.llama_memory_seq_cp(self._mem, 0, c, -1, -1)
            rngs = [np.random.default_rng(int(x)) for x in seeds]
            bias_ids = np.array(list(request.logit_bias), dtype=np.intc)
            bias_vals = np.array(list(request.logit_bias.values()), dtype=np.float32)
            out: list[list[TokenEvent]] = [list(head) for _ in range(n)]
            emitters = [TokenEmitter(tuple(s.stop)) for _ in range(n)]
            # Forced tokens come first in every child, with their telemetry from the prefix.
            live = list(range(n))
            rows = {c: -1 for c in live}  # logits row of each child after the last decode
            pos = len(ids)
            steps = 0
            want = L.ranking_size(k, s.temperature, s.top_k)
            # Each step's batch decodes on the decode thread while the children's events are
            # built and emitted; the batch holds the children whose token did not end them.
            pending = False  # a batch is decoding on the decode thread
            batch: list[tuple[int, int]] = []  # (child, token) in the pending batch's order
            try:
                while live and steps < max_new:
                    if cancel is not None and cancel.is_set():
                        break
                    if pending:
                        self._decoder.wait()
                        pending = False
                        rows = {c: i for i, (c, _) in enumerate(batch)}
                        self._past.extend(t for c, t in batch if c == 0)
                    picks: list[tuple[int, int, np.ndarray, float, float, np.ndarray | None]] = []
                    for c in live:
                        x = np.array(self._logits(rows[c]), dtype=np.float32)
                        # As in stream: the maximum, log Z, entropy and the ranking in one pass.
                        m, log_z, entropy, ranked = L.scan(x, want, ibuf)
                        xs = x
                        if bias_ids.size:
                            xs = x.copy()
                            xs[bias_ids] += bias_vals
                        tok, _ = L.sample(
                            xs,
                            s.temperature,
                            s.top_p,
                            s.top_k,
                            rngs[c],
                            ranked=ranked if xs is x else None,
                            m=m if xs is x else None,
                        )
                        if not self._is_eog(tok):
                            picks.append((c, tok, x, log_z, entropy, ranked))
                    steps += 1
                    batch = [(c, tok) for c, tok, *_ in picks]
                    if batch and steps < max_new:
                        items = [(tok, pos, c, True) for c, tok in batch]
                        self._decoder.start(items)
                        pending = True
                    live = []
                    for c, tok, x, log_z, entropy, ranked in picks:
                        top_ids = ranked[:k] if ranked is not None and k else None
                        ev = self._token_event(tok, emitters[c], x, log_z, entropy, top_ids)
                        out[c].extend(emitters[c].push(ev))
                        if not emitters[c].stopped:
                            live.append(c)
                    pos += 1
            finally:
                if pending:
                    try:
                        self._decoder.wait()
                        self._past.extend(t for c, t in batch if c == 0)
                    except Exception:
                        pass
                for c in range(1, n):
                    self._c.llama_memory_seq_rm(self._mem, c, -1, -1)
                # Sequence 0's cache ends where _past says.
                self._c.llama_memory_seq_rm(self._mem, 0, len(self._past), -1)
                self._seq0_cut = min(self._seq0_cut, len(self._past))
            for c in range(n):
                out[c].extend(emitters[c].flush())
            return out

    def _token_event(
        self,
        tok: int,
        emitter: TokenEmitter,
        x: np.ndarray,
        log_z: float,
        entropy: float,
        top_ids: np.ndarray | None,
        **steering: Any,
    ) -> TokenEvent:
        """One step's event: the chosen token with the model's own telemetry (its text from
        ``emitter``'s incremental UTF-8 decoder, which it is pushed to next), plus what
        steering did."""
        top: tuple[Alternative, ...] = ()
        if top_ids is not None:
            # One gather for the values, text and bytes from a per-id cache.
            shown = self._shown
            alts = []
            for i, v in zip(top_ids.tolist(), x[top_ids].tolist(), strict=True):
                tb = shown.get(i)
                if tb is None:
                    b = self.piece(i)
                    tb = shown[i] = (alt_text(b), b)
                alts.append(Alternative(tb[0], v - log_z, i, tb[1]))
            top = tuple(alts)
        b = self.piece(tok)
        return TokenEvent(
            text=emitter.decode(b),
            token_id=tok,
            bytes=b,
            logprob=float(x[tok]) - log_z,
            top=top,
            entropy=entropy,
            **steering,
        )

    def close(self) -> None:
        """Free the context, then the model."""
        decoder = getattr(self, "_decoder", None)
        if decoder is not None:
            decoder.close()
        side = getattr(self, "_side", None)
        if side is not None:
            side.close()
            self._side = None
        c = getattr(self, "_c", None)
        if c is not None:
            if getattr(self, "_batch", None) is not None:
                c.llama_batch_free(self._batch)
                self._batch = None
            if getattr(self, "_ctx", None):
                c.llama_free(self._ctx)
                self._ctx = None
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None  # type: ignore[assignment]

    # -- scoring continuations (councils: who speaks next, counterfactual surprisal) -----------

    def score_continuations(
        self, request: GenerationRequest, texts: Sequence[str], prefix: str = ""
    ) -> list[float]:
        """Total log-probability (nats) of each text continuing the request's prompt followed
        by ``prefix`` (prompt and prefix tokenized apart, each text tokenized on its own).

        Short texts (markers) are scored as parallel sequences in one batch
        (:meth:`score_sequences`); long ones by decoding them on a copy of the context.
        """
        if not self._lock.acquire(timeout=600):
            raise BackendError("the model is busy with another generation")
        try:
            ids = self.prompt_ids(request) + (self.tokenize(prefix) if prefix else [])
            seqs = [self.tokenize(t) for t in texts]
            longest = max((len(s) for s in seqs), default=0)
            if len(ids) + longest > self._n_ctx:
                raise BackendError(
                    f"prompt and text are {len(ids) + longest} tokens; context is {self._n_ctx}"
                )
            self._eval_prompt(ids or [self._llm.token_bos()], fresh=False)
            x = np.array(self._logits(-1), dtype=np.float32)
            log_z = L.log_partition(x)
            out = [0.0] * len(seqs)
            group: list[int] = []
            budget = 0
            for i, s in enumerate(seqs):
                if len(s) - 1 > N_BATCH // 2:
                    out[i] = self._score_long(s, x, log_z)
                    continue
                if group and (budget + len(s) - 1 > N_BATCH or len(group) >= N_SEQ_MAX - 1):
                    for j, lp in zip(
                        group, self.score_sequences([seqs[j] for j in group], x, log_z), strict=True
                    ):
                        out[j] = lp
                    group, budget = [], 0
                group.append(i)
                budget += max(0, len(s) - 1)
            if group:
                for j, lp in zip(
                    group, self.score_sequences([seqs[j] for j in group], x, log_z), strict=True
                ):
                    out[j] = lp
            return out
        finally:
            self._lock.release()

    def _score_long(self, seq: Sequence[int], x: np.ndarray, log_z: float) -> float:
        """Log-probability of a long token sequence after sequence 0, decoded in chunks on
        sequence 1 (a copy of sequence 0's cache, removed afterwards)."""
        total = float(x[seq[0]]) - log_z
        n_past = len(self._past)
        self._c.llama_memory_seq_cp(self._mem, 0, 1, -1, -1)
        try:
            for a in range(0, len(seq) - 1, N_BATCH):
                chunk = seq[a : min(a + N_BATCH, len(seq) - 1)]
                self._decode([(t, n_past + a + j, 1, True) for j, t in enumerate(chunk)])
                for j in range(len(chunk)):
                    row = self._logits(j)
                    total += float(row[seq[a + j + 1]]) - L.log_partition(row)
        finally:
            self._c.llama_memory_seq_rm(self._mem, 1, -1, -1)
        return total
