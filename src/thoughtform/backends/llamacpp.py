"""The embedded default backend: llama-cpp-python with telemetry from a logits processor.

llama-cpp-python's own ``logprobs`` need ``logits_all=True`` (a ctx x vocab float array and a
Python sort per token: ~6x slower). Instead a logits processor sees each step's raw logits once,
takes the top-k with ``numpy.argpartition`` and the exact entropy from the full distribution.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..trace import Alternative
from .base import (
    BackendError,
    Capabilities,
    FinishEvent,
    GenerationRequest,
    StreamEvent,
    TokenEvent,
    alt_text,
)

MAX_ALTERNATIVES = 50

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


class _Telemetry:
    """A logits processor that records each step's logits, log-partition, top-k and entropy.

    Cost matters: it runs once per token on the full vocabulary (49,152 for SmolLM2), so it
    works in float32 and avoids materialising the log-softmax: entropy is
    H = log Z - E_p[x] with E_p[x] = (exp(x - m) . x) / sum(exp(x - m)).
    """

    def __init__(self, k: int, bias: dict[int, float] | None = None) -> None:
        self.k = k
        self.logits: np.ndarray | None = None
        self.log_z = 0.0
        self.top_ids: np.ndarray | None = None
        self.entropy: float | None = None
        self._bias_ids = np.array(list(bias), dtype=np.intc) if bias else None
        self._bias_vals = np.array(list(bias.values()), dtype=np.single) if bias else None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # A copy: llama.cpp reuses the buffer once the token is sampled.
        x = np.array(scores, dtype=np.float32)
        m = float(x.max())
        z = np.exp(x - m)
        s = float(z.sum())
        self.log_z = m + math.log(s)
        self.entropy = max(0.0, self.log_z - float(np.dot(z, x)) / s)
        self.logits = x
        k = min(self.k, x.shape[0])
        if k > 0:
            idx = np.argpartition(x, x.shape[0] - k)[-k:]
            self.top_ids = idx[np.argsort(-x[idx], kind="stable")]
        else:
            self.top_ids = None
        if self._bias_ids is not None and self._bias_vals is not None:
            out = np.array(scores, dtype=np.single, copy=True)
            out[self._bias_ids] += self._bias_vals
            return out
        return scores

    def logprob(self, tok: int) -> float | None:
        """Log-probability of token ``tok`` at the last step (raw model distribution)."""
        if self.logits is None:
            return None
        return float(self.logits[tok]) - self.log_z


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
    ) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise BackendError(
                "backend 'llamacpp' needs llama-cpp-python: pip install 'thoughtform[llama]'"
            ) from e
        from ..models import resolve_model

        if model == "embedded-voices":
            # The embedded model with the voices LoRA adapter shipped in the package.
            from ..adapters import voices_adapter_path

            adapter = voices_adapter_path()
            if not adapter.is_file():
                raise BackendError(f"{adapter}: voices adapter not built (run `make adapter`)")
            lora_path = lora_path or adapter
            model = None
        path = Path(resolve_model(model))
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
        if lora_path is not None and not Path(lora_path).is_file():
            # llama-cpp-python does not check: a missing adapter crashes the first decode.
            raise BackendError(f"{lora_path}: LoRA adapter file not found")
        self.model_path = path
        self.model_name = "embedded" if model in (None, "embedded") else path.name
        if lora_path:
            self.model_name += f"+{Path(lora_path).stem}"
        self.lora_path = Path(lora_path) if lora_path else None
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads or decode_threads(),
                n_threads_batch=n_threads or _cores(),
                lora_path=str(lora_path) if lora_path else None,
                seed=seed if seed is not None else 0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"{path}: cannot load model: {e}") from None
        self._lock = threading.Lock()
        self._piece_cache: dict[int, bytes] = {}
        self._formatter = self._make_formatter()
        self._eos = self._llm.token_eos()

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
        """Full telemetry: top-k up to 50, exact entropy, logit bias, grammar."""
        return Capabilities(
            logprobs=True,
            max_alternatives=MAX_ALTERNATIVES,
            exact_entropy=True,
            logit_bias=True,
            grammar=True,
            chat=self._formatter is not None,
            completion=True,
        )

    def chat_prompt(self, request: GenerationRequest) -> str:
        """The prompt text the GGUF's chat template makes of the request's messages."""
        if self._formatter is None:
            raise BackendError(f"{self.model_path.name}: the GGUF has no chat template")
        msgs = [{"role": m.role, "content": m.content} for m in request.messages]
        return str(self._formatter(messages=msgs).prompt)

    def _alternative(self, tok: int, tel: _Telemetry) -> Alternative:
        b = self._piece(tok)
        return Alternative(alt_text(b), tel.logprob(tok), tok, b)

    def _piece(self, tok: int) -> bytes:
        b = self._piece_cache.get(tok)
        if b is None:
            b = self._llm.detokenize([tok])
            self._piece_cache[tok] = b
        return b

    def _grammar_ok(self, text: str) -> bool:
        """Whether llama.cpp parses the GBNF grammar (LlamaGrammar.from_string does not check,
        and sampling with a grammar that failed to parse crashes the process)."""
        import llama_cpp

        smpl = llama_cpp.llama_sampler_init_grammar(
            self._llm._model.vocab, text.encode("utf-8"), b"root"
        )
        if not smpl:
            return False
        llama_cpp.llama_sampler_free(smpl)
        return True

    def _is_eog(self, tok: int) -> bool:
        try:
            import llama_cpp

            return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, tok))
        except (AttributeError, TypeError):
            return tok == self._eos

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Generate token by token with top-k, logprob and exact entropy for each step."""
        t0 = time.perf_counter()
        if not self._lock.acquire(timeout=600):
            yield FinishEvent("error", "the model is busy with another generation")
            return
        n = 0
        try:
            try:
                if request.is_chat:
                    prompt = self.chat_prompt(request)
                    ids = self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
                else:
                    ids = self._llm.tokenize((request.prompt or "").encode("utf-8"), special=False)
            except BackendError as e:
                yield FinishEvent("error", str(e))
                return
            s = request.sampling
            room = self._llm.n_ctx() - len(ids)
            if room <= 0:
                yield FinishEvent(
                    "error", f"prompt is {len(ids)} tokens; context is {self._llm.n_ctx()}"
                )
                return
            max_new = min(s.max_tokens or room, room)
            k = max(0, min(request.alternatives, MAX_ALTERNATIVES))
            tel = _Telemetry(k, request.logit_bias or None)
            from llama_cpp import LogitsProcessorList

            grammar = None
            if request.grammar:
                from llama_cpp import LlamaGrammar

                if not self._grammar_ok(request.grammar):
                    yield FinishEvent("error", "invalid GBNF grammar (it does not parse)")
                    return
                grammar = LlamaGrammar.from_string(request.grammar, verbose=False)
            self._llm.set_seed(s.seed if s.seed is not None else random.randrange(2**31))
            if s.seed is not None:
                # Reusing the cached prompt prefix re-evaluates only its last token, and a single
                # token goes through other kernels than a batch: logits differ in the last bits
                # and a seeded sample can flip. A seed promises a repeatable reply, so evaluate
                # the whole prompt afresh; unseeded chats keep the faster prefix reuse.
                self._llm.reset()
            gen = self._llm.generate(
                ids,
                reset=s.seed is None,
                top_k=s.top_k if s.top_k > 0 else 0,
                top_p=s.top_p,
                min_p=0.0,
                temp=max(0.0, s.temperature),
                repeat_penalty=1.0,
                logits_processor=LogitsProcessorList([tel]),
                grammar=grammar,
            )
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text_so_far = ""
            t_first: float | None = None
            reason = "length"
            try:
                for tok in gen:
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    if self._is_eog(tok):
                        reason = "stop"
                        break
                    b = self._piece(tok)
                    piece = decoder.decode(b)
                    top: tuple[Alternative, ...] = ()
                    if tel.top_ids is not None:
                        top = tuple(self._alternative(int(i), tel) for i in tel.top_ids)
                    if t_first is None:
                        t_first = time.perf_counter() - t0
                    if s.stop:
                        text_so_far += piece
                        hit = min(
                            (text_so_far.find(x) for x in s.stop if x in text_so_far), default=-1
                        )
                        if hit >= 0:
                            # Keep the text before the stop string; drop the rest.
                            before = len(text_so_far) - len(piece)
                            piece = piece[: max(0, hit - before)]
                            if piece:
                                yield TokenEvent(piece, tok, b, tel.logprob(tok), top, tel.entropy)
                                n += 1
                            reason = "stop"
                            break
                    yield TokenEvent(
                        text=piece,
                        token_id=tok,
                        bytes=b,
                        logprob=tel.logprob(tok),
                        top=top,
                        entropy=tel.entropy,
                    )
                    n += 1
                    if n >= max_new:
                        reason = "length"
                        break
            finally:
                gen.close()
            tail = decoder.decode(b"", final=True)
            if tail:
                yield TokenEvent(text=tail)
            timings = {"total_s": time.perf_counter() - t0}
            if t_first is not None:
                timings["first_token_s"] = t_first
            yield FinishEvent(
                reason,  # type: ignore[arg-type]
                timings=timings,
                usage={"prompt_tokens": len(ids), "completion_tokens": n},
            )
        except GeneratorExit:
            raise
        except Exception as e:  # keep the partial reply; report the fault as the final event
            yield FinishEvent("error", f"{type(e).__name__}: {e}")
        finally:
            self._lock.release()

    def close(self) -> None:
        """Free the model."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None  # type: ignore[assignment]
