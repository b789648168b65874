"""Hugging Face ``transformers`` backend: exact entropy, attention summaries and a logit lens.

Runs its own token-by-token loop over the KV cache, so every step sees the full logits (exact
logprobs and entropy), the attention rows and the hidden states. A GGUF (e.g. the embedded
SmolLM2) is dequantized once and cached as safetensors, so later loads take about a second.
``embedded-voices`` is that model with the shipped voices LoRA (``thoughtform.adapters``) added to
its weights, the same model llama.cpp runs for that name.

Nothing here downloads: every loader runs offline (``local_files_only``, hub offline mode), and a
name that is neither a local path nor already in the local Hugging Face cache is a BackendError.

Telemetry conventions:

* ``logprob``/``top``/``entropy`` (nats) come from the full log-softmax of the model's logits
  (plus ``logit_bias``) at temperature 1, before temperature/top-k/top-p shape the sampling.
* Attention for generated token ``i`` is the head-averaged row of the query that *chose* it,
  i.e. the last position before it: it covers absolute positions ``0 .. P+i-1`` where ``P`` is
  the prompt length (``backend.prompt_tokens``). ``prompt_mass[l]`` is the mass on positions
  ``< P``; ``segment_mass[l]`` the mass per bucket of earlier generated tokens, bucket
  ``segment_of(j)`` for generated index ``j`` (default ``j // bucket_tokens``, 32 tokens), with
  buckets under 1e-4 left out; ``top[l]`` the top-8 ``(absolute position, weight)``.
  Memory per token is O(layers x (8 + buckets)), never O(tokens x heads).
* ``lens[l]`` is the top-1 token of layer ``l``'s output through the final norm and lm_head
  (the last entry is the model's own argmax, bias excluded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import resolve_model, user_cache_dir
from ..trace import Alternative, AttentionSummary
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

CACHE_FORMAT = 1  # bump when the cached layout changes, so stale caches are not reused
VOICES_MODEL = "embedded-voices"  # the embedded model + the shipped voices adapter
MAX_ALTERNATIVES = 20
TOP_POSITIONS = 8
MIN_SEGMENT_MASS = 1e-4
_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------- token bytes


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable stand-in char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The ``tokenizers`` decoder types in use (e.g. ``{"ByteLevel"}``), empty if unknown."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    try:
        # Only the decoder's own JSON: serialising the whole tokenizer takes ~0.4 s.
        dec = json.loads(decoder.__getstate__())
    except (ValueError, TypeError, AttributeError):
        return {type(decoder).__name__}
    kinds: set[str] = set()
    stack = [dec]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(str(d.get("type")))
            stack.extend(d.get("decoders") or [])
    return kinds


def token_bytes_table(tokenizer: Any) -> list[bytes]:
    """Each token id's own bytes (byte-level BPE via the GPT-2 byte map; SentencePiece pieces
    with ``▁`` and ``<0xNN>``; added/special tokens as their UTF-8 text)."""
    n = len(tokenizer)
    pieces: list[str | None] = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    # Stand-in char -> the latin-1 char of its byte, so translate+encode runs in C.
    to_latin1 = {ord(c): b for c, b in _gpt2_byte_decoder().items()}
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(b"")
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif byte_level:
            try:
                out.append(piece.translate(to_latin1).encode("latin-1"))
            except UnicodeEncodeError:  # a char outside the byte map: keep it as UTF-8
                out.append(
                    b"".join(
                        bytes([to_latin1[ord(c)]]) if ord(c) in to_latin1 else c.encode("utf-8")
                        for c in piece
                    )
                )
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                out.append(bytes([int(piece[3:5], 16)]))
            except ValueError:
                out.append(piece.encode("utf-8"))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out


# ---------------------------------------------------------------------------- loading


def _gguf_cache_key(path: Path) -> str:
    """Cache directory name for a GGUF: its stem plus a hash of name, size and mtime."""
    st = path.stat()
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80]
    return f"{stem}-{h.hexdigest()[:16]}"


def gguf_cache_dir(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the safetensors conversion of GGUF ``path`` is (or will be) cached."""
    base = Path(cache_dir).expanduser() if cache_dir else user_cache_dir() / "transformers"
    return base / _gguf_cache_key(path)


_DONE = "thoughtform-cache.json"  # written last: a directory without it is incomplete


def _save_cache(model: Any, tokenizer: Any, target: Path, source: Path) -> bool:
    """Write model + tokenizer as safetensors into ``target`` atomically; False on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        # A GGUF-loaded model still claims to be quantized; saving would then refuse or write
        # a config that reloads through the GGUF path. The weights are plain tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(
            json.dumps({"format": CACHE_FORMAT, "source": str(source)}), encoding="utf-8"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race (or target is stale): keep theirs if complete.
            if not (target / _DONE).exists():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
        return True
    except OSError as e:
        print(f"thoughtform: cannot cache converted model in {target}: {e}", file=sys.stderr)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hub_offline() -> None:
    """Put the Hugging Face libraries in offline mode for this process: thoughtform never
    downloads. The environment covers libraries not imported yet; huggingface_hub reads it once
    at import (Gradio imports it before any backend exists), so its flag is set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        setattr(hub, "HF_HUB_OFFLINE", True)  # noqa: B010  (a module global, set on purpose)


def not_local(spec: object) -> BackendError:
    """The error for a model name that would need a download."""
    return BackendError(
        f"model {spec} is not a local path or a cached model; thoughtform never downloads"
    )


def _unpermute_rows(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's rotary row permutation (``train.export.permute_rows``): within each head
    rows ``[x0, y0, x1, y1, ...]`` go back to ``[x0, x1, ..., y0, y1, ...]``."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise BackendError(f"cannot un-permute {rows} rows into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def apply_gguf_lora(model: Any, path: str | os.PathLike[str]) -> int:
    """Add a llama.cpp GGUF LoRA to ``model``'s weights in place (``W += alpha/r * B @ A``);
    return how many matrices changed.

    The file is in llama.cpp's layout (``train.export`` wrote it so): q/k ``B`` rows are in its
    rotary order, which transformers undoes when it reads a GGUF, so they are un-permuted here."""
    import torch

    from ..train.export import PERMUTED_ARCHS, TENSOR_NAMES, read_lora_gguf

    try:
        meta, arrays = read_lora_gguf(Path(path))
    except (OSError, ValueError, KeyError) as e:
        raise BackendError(f"{path}: not a readable GGUF LoRA ({e})") from None
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise BackendError(f"{path}: not a GGUF LoRA adapter")
    alpha = float(meta.get("adapter.lora.alpha") or 0)
    permuted = str(meta.get("general.architecture")) in PERMUTED_ARCHS
    cfg = model.config
    n_head = int(cfg.num_attention_heads)
    n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    module_of = {v: k for k, v in TENSOR_NAMES.items()}  # attn_q -> q_proj ...
    layers = model.get_decoder().layers
    changed = 0
    for name, a in arrays.items():
        if not name.endswith(".weight.lora_a"):
            continue
        blk, layer, kind = name.split(".")[:3]
        b = arrays.get(name[:-1] + "b")
        module = module_of.get(kind)
        if blk != "blk" or b is None or module is None:
            raise BackendError(f"{path}: unexpected LoRA tensor {name}")
        if permuted and module in ("q_proj", "k_proj"):
            b = _unpermute_rows(b, n_head if module == "q_proj" else n_head_kv)
        part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        weight = getattr(getattr(layers[int(layer)], part), module).weight
        scale = alpha / a.shape[0] if alpha else 1.0
        delta = torch.from_numpy(b @ a).to(weight.dtype) * scale
        if tuple(delta.shape) != tuple(weight.shape):
            raise BackendError(
                f"{path}: {name} makes {tuple(delta.shape)}, the model's weight is "
                f"{tuple(weight.shape)} (an adapter for another model?)"
            )
        with torch.no_grad():
            weight.add_(delta)
        changed += 1
    if not changed:
        raise BackendError(f"{path}: the adapter has no LoRA tensors")
    return changed


@dataclass
class Loaded:
    """A loaded model with its tokenizer and how it was obtained."""

    model: Any
    tokenizer: Any
    name: str
    source: str  # "gguf" (converted now), "cache", "dir" or "hub"
    load_s: float
    cache_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def load_model(
    spec: str | os.PathLike[str] | None,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "eager",
    cache_dir: str | Path | None = None,
) -> Loaded:
    """Load an HF model directory, a hub id already in the local cache, a GGUF (cached as
    safetensors), ``embedded`` or ``embedded-voices``; never from the network."""
    if dtype not in _DTYPES:
        raise BackendError(f"unsupported dtype {dtype!r} (use one of {', '.join(_DTYPES)})")
    hub_offline()
    if isinstance(spec, str) and spec.strip() == VOICES_MODEL:
        return _load_voices(device, dtype, attn_implementation, cache_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    where = resolve_model(spec)
    gguf: Path | None = None
    if isinstance(where, Path):
        if where.is_file():
            if where.suffix.lower() != ".gguf":
                raise BackendError(f"{where}: not a GGUF file or a model directory")
            gguf = where
        elif not (where / "config.json").exists():
            ggufs = sorted(where.glob("*.gguf"))
            if len(ggufs) != 1:
                raise BackendError(f"{where}: no config.json and not exactly one .gguf file")
            gguf = ggufs[0]
    kw: dict[str, Any] = {"attn_implementation": attn_implementation}
    model: Any
    tok: Any
    cache_path: Path | None = None
    try:
        if gguf is not None:
            cache_path = gguf_cache_dir(gguf, cache_dir)
            name = gguf.name
            if (cache_path / _DONE).exists():
                tok = AutoTokenizer.from_pretrained(cache_path, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(
                    cache_path, dtype=torch_dtype, local_files_only=True, **kw
                )
                source = "cache"
            else:
                # Dequantize to float32 once; the cache keeps full precision for any dtype.
                tok = AutoTokenizer.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, local_files_only=True
                )
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent,
                    gguf_file=gguf.name,
                    dtype=torch.float32,
                    local_files_only=True,
                    **kw,
                )
                _save_cache(model, tok, cache_path, gguf)
                model = model.to(torch_dtype)
                source = "gguf"
        else:
            local = isinstance(where, Path)
            name = where.name if isinstance(where, Path) else str(where)
            # No downloads at run time: a hub id must already be in the local HF cache.
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch_dtype, local_files_only=True, **kw
            )
            source = "dir" if local else "hub"
    except BackendError:
        raise
    except (OSError, ValueError) as e:
        if not isinstance(where, Path):
            # A name that is not on disk: only the local HF cache was looked at, and it is not there.
            raise not_local(where) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendError(f"cannot load model {where}: {first}") from None
    model.to(device)
    model.eval()
    return Loaded(model, tok, name, source, time.perf_counter() - t0, cache_path)


def _load_voices(
    device: str, dtype: str, attn_implementation: str, cache_dir: str | Path | None
) -> Loaded:
    """The embedded model with the shipped voices adapter merged into its float32 weights."""
    import torch

    from ..adapters import voices_adapter_path

    adapter = voices_adapter_path()
    if not adapter.is_file():
        raise BackendError(f"{adapter}: voices adapter not built (run `make adapter`)")
    t0 = time.perf_counter()
    # Merge at full precision (the cache holds float32), then cast: ~0.3 s for 210 matrices here.
    base = load_model(None, "cpu", "float32", attn_implementation, cache_dir)
    n = apply_gguf_lora(base.model, adapter)
    base.model.to(getattr(torch, dtype)).to(device)
    base.model.eval()
    base.name = VOICES_MODEL
    base.info = {"adapter": str(adapter), "lora_matrices": n, "base_source": base.source}
    base.load_s = time.perf_counter() - t0
    return base


# ---------------------------------------------------------------------------- streaming helpers


# The stop-string holder is shared with llamacpp (one copy): base.TokenEmitter.
_Emitter = TokenEmitter


def _sample(logits: Any, temperature: float, top_k: int, top_p: float, gen: Any) -> int:
    """Pick a token id: argmax at temperature 0, else temperature/top-k/top-p sampling."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, -1)
        # Drop tokens once the mass *before* them reaches top_p (the first is always kept).
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


def _rss_mb() -> dict[str, float]:
    """Resident memory in MiB: total, anonymous (private) and file-backed (Linux /proc).

    Safetensors weights are mmap'd, so they count as file-backed pages, not private memory."""
    out = {"rss": 0.0, "anon": 0.0, "file": 0.0}
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k = keys.get(line.split(":", 1)[0] + ":")
            if k:
                out[k] = round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


# ---------------------------------------------------------------------------- backend


class TransformersBackend:
    """Generates with a local ``transformers`` causal LM, reporting full-logit telemetry."""

    name = "transformers"
    #: What this backend can do before a model is loaded (the workbench enables its Attention
    #: and Logit lens switches from this; ``capabilities`` then says what the model allows).
    CAPABILITIES = Capabilities(
        logprobs=True,
        max_alternatives=MAX_ALTERNATIVES,
        exact_entropy=True,
        attention=True,
        logit_lens=True,
        logit_bias=True,
    )

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        attention: bool = True,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        segment_of: Callable[[int], int] | None = None,
        bucket_tokens: int = 32,
    ) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendError(
                f"backend 'transformers' is not installed: {e.name} (pip install 'thoughtform[hf]')"
            ) from None
        if threads:
            # Process-wide: on shared CPUs fewer threads avoid OpenMP spin-wait collapse.
            torch.set_num_threads(int(threads))
        self.device = device
        self.dtype = dtype
        self._attn_impl = "eager" if attention else "sdpa"
        self.loaded = load_model(model, device, dtype, self._attn_impl, cache_dir)
        self.model: Any = self.loaded.model
        self.tokenizer: Any = self.loaded.tokenizer
        self.model_name = self.loaded.name
        #: Maps a generated token index to its attention bucket (e.g. its voice segment).
        self.segment_of = segment_of
        self.bucket_tokens = max(1, int(bucket_tokens))
        #: Prompt length of the current/last stream: attention positions below it are prompt.
        self.prompt_tokens = 0
        self._lock = threading.Lock()
        self._closed = False
        self._bytes = token_bytes_table(self.tokenizer)
        self._eos = self._eos_ids()
        self._vocab: Any = None
        self._norm, self._head = self._lens_modules()
        self._cache_kw = self._cache_kwarg()
        self.n_layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    # -- introspection

    @property
    def capabilities(self) -> Capabilities:
        """Full logits: exact entropy, attention, logit lens, logit bias; no grammar."""
        return Capabilities(
            logprobs=True,
            max_alternatives=MAX_ALTERNATIVES,
            exact_entropy=True,
            attention=True,
            logit_lens=self._norm is not None and self._head is not None,
            logit_bias=True,
            grammar=False,
            chat=bool(getattr(self.tokenizer, "chat_template", None)),
            completion=True,
            token_control=True,
            voice_scores="exact",
            voice_vectors=True,
            branching=True,  # prefix ids fed after the prompt, forced ids emitted first
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation (ban them with ``logit_bias`` for fixed lengths)."""
        return frozenset(self._eos)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            e = getattr(src, "eos_token_id", None)
            ids.update([e] if isinstance(e, int) else (e or []))
        if isinstance(self.tokenizer.eos_token_id, int):
            ids.add(self.tokenizer.eos_token_id)
        eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
            ids.add(eot)
        return ids

    def _lens_modules(self) -> tuple[Any, Any]:
        head = self.model.get_output_embeddings()
        base = getattr(self.model, "base_model", self.model)
        norm = next(
            (getattr(base, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(base, n)),
            None,
        )
        return norm, head

    def _cache_kwarg(self) -> str:
        import inspect

        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token id (empty for ids outside the tokenizer)."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        """Token ids of the prompt: the chat template with a generation prompt, or raw text."""
        tok = self.tokenizer
        if request.is_chat:
            if not getattr(tok, "chat_template", None):
                raise BackendError(f"{self.model_name} has no chat template: use a raw prompt")
            msgs = [{"role": m.role, "content": m.content} for m in request.messages]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            # The template already holds any BOS/special markers.
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(request.prompt or "")["input_ids"])
            if not ids and tok.bos_token_id is not None:
                ids = [int(tok.bos_token_id)]
        if not ids:
            raise BackendError("empty prompt and the tokenizer has no BOS token")
        return [int(i) for i in ids]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, no BOS or other special tokens added."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    # -- generation

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Generate token by token, yielding TokenEvents then one FinishEvent."""
        t0 = time.perf_counter()
        # Wait for another stream on this model to finish, but give up when cancelled.
        while not self._lock.acquire(timeout=0.05):
            if cancel is not None and cancel.is_set():
                yield FinishEvent("cancelled", "cancelled while waiting for the model")
                return
        try:
            yield from self._run(request, cancel, t0)
        except GeneratorExit:
            return
        finally:
            self._lock.release()

    def _run(
        self, request: GenerationRequest, cancel: threading.Event | None, t0: float
    ) -> Iterator[StreamEvent]:
        import torch

        s = request.sampling
        emitter = _Emitter(s.stop)
        n = 0
        reason: FinishReason = "stop"
        message = ""
        timings: dict[str, float] = {}
        prompt_len = 0
        try:
            if self._closed:
                raise BackendError("backend is closed")
            ids = self.encode_prompt(request)
            prompt_len = self.prompt_tokens = len(ids)
            # A branch: the parent's reply tokens go into the cache after the prompt (counted
            # as earlier reply tokens, not prompt, for attention), then the forced ids lead.
            ids += [int(t) for t in request.prefix]
            forced_queue = [int(t) for t in request.forced]
            if self.n_ctx and len(ids) >= self.n_ctx:
                raise BackendError(f"prompt has {len(ids)} tokens; the context is {self.n_ctx}")
            want_att = bool(request.attention)
            want_lens = bool(request.logit_lens) and self.capabilities.logit_lens
            if want_att and self.model.config._attn_implementation != "eager":
                # SDPA cannot return attention weights; switch this model over for good.
                self.model.set_attn_implementation("eager")
                self._attn_impl = "eager"
            k_alt = max(0, min(int(request.alternatives), MAX_ALTERNATIVES))
            gen = torch.Generator(device=self.device)
            if s.seed is not None:
                gen.manual_seed(int(s.seed))
            else:
                gen.seed()
            bias = self._bias_tensors(request.logit_bias)
            limit = s.max_tokens if s.max_tokens and s.max_tokens > 0 else 0
            conductor = request.conductor
            hooks = None
            if conductor is not None:
                conductor.bind(self.vocab())
                hooks = self._vector_hooks(conductor.plan)
            with torch.inference_mode():
                cache = self._new_cache()
                tp = time.perf_counter()
                if len(ids) > 1:
                    # Prefill all but the last prompt token without attentions/hidden states
                    # (those would be prompt^2 x heads x layers); the last one is step 0's input.
                    self.model(
                        input_ids=torch.tensor([ids[:-1]], device=self.device),
                        use_cache=True,
                        logits_to_keep=1,
                        **{self._cache_kw: cache},
                    )
                timings["prompt_s"] = time.perf_counter() - tp
                tg = time.perf_counter()
                last = ids[-1]
                gen_ids: list[int] = []
                while True:
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    if limit and n >= limit:
                        reason = "length"
                        break
                    if self.n_ctx and len(ids) + n >= self.n_ctx:
                        reason, message = "length", "context full"
                        break
                    out = self.model(
                        input_ids=torch.tensor([[last]], device=self.device),
                        use_cache=True,
                        output_attentions=want_att,
                        output_hidden_states=want_lens,
                        **{self._cache_kw: cache},
                    )
                    raw_logits = out.logits[0, -1].float()
                    logits = raw_logits
                    if bias is not None:
                        logits = raw_logits.clone()
                        logits.index_add_(0, bias[0], bias[1])

                    def score(seqs: Any, raw: Any = raw_logits, kv: Any = cache) -> list[float]:
                        return self._score_sequences(seqs, raw, kv)

                    step = conductor.step(score) if conductor is not None else None
                    forced = False
                    steered = bias is not None
                    slp: float | None = None
                    if step is not None and hooks is not None:
                        if step.vector != hooks.active:
                            hooks.set_many([(v, x) for v, x in step.vector if v in hooks])
                    force = step.force if step is not None else None
                    if forced_queue and force is None:
                        force = forced_queue.pop(0)
                    if force is not None:
                        tid, forced, steered, slp = int(force), True, True, 0.0
                    else:
                        temp, top_p, top_k = s.temperature, s.top_p, s.top_k
                        if step is not None:
                            temp, top_p, top_k = step.temperature, step.top_p, step.top_k
                            steered = steered or (temp, top_p) != (s.temperature, s.top_p)
                            if step.ban is not None and step.ban.size:
                                logits = logits.clone()
                                logits[torch.as_tensor(step.ban, device=logits.device)] = float(
                                    "-inf"
                                )
                                steered = True
                        tid = _sample(logits, temp, top_k, top_p, gen)
                        if steered:
                            slp = float(torch.log_softmax(logits / max(temp, 1e-6), -1)[tid])
                        if step is not None and step.intercept and conductor is not None:
                            tid2, forced = conductor.intercept(tid, score)
                            if forced:
                                tid, steered, slp = int(tid2), True, 0.0
                    if tid in self._eos:
                        reason = "stop"
                        break
                    ev = self._token_event(
                        tid,
                        raw_logits,  # the model's own distribution, whatever steering did
                        k_alt,
                        self._attention(
                            out.attentions,
                            prompt_len,
                            len(ids) - prompt_len + n,
                            request.segment_of,
                        )
                        if want_att
                        else None,
                        self._lens(out.hidden_states, raw_logits) if want_lens else None,
                    )
                    ev = dataclasses.replace(
                        ev,
                        text=emitter.decode(self.token_bytes(tid)),
                        steered=steered,
                        steered_logprob=slp if steered else None,
                        forced=forced,
                        vector=step.vector if step is not None and step.vector else (),
                    )
                    gen_ids.append(tid)
                    n += 1
                    last = tid
                    yield from emitter.push(ev)
                    if emitter.stopped:
                        reason = "stop"
                        break
                timings["gen_s"] = time.perf_counter() - tg
                del cache
                if hooks is not None:
                    hooks.remove()
        except GeneratorExit:
            raise
        except Exception as e:  # any failure ends the stream, keeping what was generated
            reason = "error"
            message = f"{type(e).__name__}: {e}" if not isinstance(e, BackendError) else str(e)
        yield from emitter.flush()
        timings["total_s"] = time.perf_counter() - t0
        if timings.get("gen_s"):
            timings["tokens_per_s"] = n / timings["gen_s"]
        yield FinishEvent(
            reason,
            message,
            timings=timings,
            usage={
                "prompt_tokens": prompt_len,
                "prefix_tokens": len(request.prefix),
                "completion_tokens": n,
            },
        )

    def vocab(self) -> Any:
        """The vocabulary as the conductor needs it (built once)."""
        if self._vocab is None:
            from ..steer import Vocab

            tok = self.tokenizer

            def tokenize(text: str) -> list[int]:
                return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]

            self._vocab = Vocab(self._bytes, self._eos, tokenize)
        return self._vocab

    def _vector_hooks(self, plan: Any) -> Any:
        """Forward hooks adding the plan's voice vectors (None when it asks for none)."""
        if not plan.vectors and not plan.whole_vectors:
            return None
        from ..vectors.hooks import VectorHooks
        from ..vectors.sets import load_vector_set

        vset = load_vector_set(plan.vector_dir or "seed")
        names = set(plan.vectors) | set(plan.whole_vectors)
        chosen = {v: cv for v in names if (cv := vset.get(v)) is not None}
        return VectorHooks(self.model, chosen).install()

    def _score_sequences(self, seqs: Any, raw_logits: Any, cache: Any) -> list[float]:
        """Log-probability of each token sequence continuing the context in ``cache`` whose
        next-token logits are ``raw_logits``: each sequence's tokens run over the cache, which
        is cropped back after (the same exact scores llamacpp gets from parallel sequences)."""
        import torch

        base = torch.log_softmax(raw_logits, -1)
        length = cache.get_seq_length()
        out: list[float] = []
        for s in seqs:
            s = [int(t) for t in s]
            lp = float(base[s[0]]) if s else 0.0
            if len(s) > 1:
                res = self.model(
                    input_ids=torch.tensor([s[:-1]], device=self.device),
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
                logp = torch.log_softmax(res.logits[0].float(), -1)
                lp += float(sum(logp[j, s[j + 1]] for j in range(len(s) - 1)))
                # transformers 5 crops by a negative count (tokens to drop from the end).
                cache.crop(-(cache.get_seq_length() - length))
            out.append(lp)
        return out

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _bias_tensors(self, logit_bias: dict[int, float]) -> tuple[Any, Any] | None:
        import torch

        if not logit_bias:
            return None
        vocab = int(self.model.config.vocab_size)
        items = [(int(k), float(v)) for k, v in logit_bias.items() if 0 <= int(k) < vocab]
        if not items:
            return None
        idx = torch.tensor([k for k, _ in items], device=self.device)
        val = torch.tensor([v for _, v in items], device=self.device, dtype=torch.float32)
        return idx, val

    def _token_event(
        self,
        tid: int,
        logits: Any,
        k_alt: int,
        attention: AttentionSummary | None,
        lens: tuple[str, ...] | None,
    ) -> TokenEvent:
        import torch

        logp = torch.log_softmax(logits, -1)
        # Exact entropy over the whole vocabulary; entr() treats p=0 (banned tokens) as 0.
        entropy = float(torch.special.entr(logp.exp()).sum())
        top: tuple[Alternative, ...] = ()
        if k_alt:
            vals, idx = torch.topk(logp, k_alt)
            top = tuple(
                Alternative(alt_text(self.token_bytes(i)), lp, i, self.token_bytes(i))
                for lp, i in zip(vals.tolist(), idx.tolist(), strict=True)
            )
        raw = self.token_bytes(tid)
        return TokenEvent(
            text="",  # set by the emitter's incremental UTF-8 decoder
            token_id=tid,
            bytes=raw,
            logprob=float(logp[tid]),
            top=top,
            entropy=entropy,
            attention=attention,
            lens=lens,
        )

    def _attention(
        self,
        attentions: Any,
        prompt_len: int,
        n_gen: int,
        segment_of: Callable[[int], int] | None = None,
    ) -> AttentionSummary | None:
        """Compress this step's per-layer attention rows (see the module docstring)."""
        import torch

        if not attentions or attentions[0] is None:
            return None
        # (layers, positions): head-averaged row of the single query of this step.
        rows = torch.stack([a[0, :, -1, :] for a in attentions]).float().mean(1)
        seq = rows.shape[1]
        prompt_mass = rows[:, :prompt_len].sum(1).tolist()
        gen_rows = rows[:, prompt_len:]
        g = gen_rows.shape[1]  # == n_gen: earlier generated tokens in the cache
        segment_mass: list[list[tuple[int, float]]] = [[] for _ in range(rows.shape[0])]
        if g:
            seg_of = segment_of or self.segment_of
            if seg_of is None:
                seg = torch.arange(g, device=rows.device) // self.bucket_tokens
            else:
                seg = torch.tensor([int(seg_of(j)) for j in range(g)], device=rows.device)
            uniq, inv = torch.unique(seg, return_inverse=True)
            mass = torch.zeros(rows.shape[0], len(uniq), device=rows.device)
            mass.index_add_(1, inv, gen_rows)
            ids = uniq.tolist()
            for layer, ms in enumerate(mass.tolist()):
                segment_mass[layer] = [
                    (ids[i], m) for i, m in enumerate(ms) if m >= MIN_SEGMENT_MASS
                ]
        w, pos = torch.topk(rows, min(TOP_POSITIONS, seq), dim=1)
        top = [list(zip(p, x, strict=True)) for p, x in zip(pos.tolist(), w.tolist(), strict=True)]
        return AttentionSummary(
            segment_mass=segment_mass, top=top, prompt_mass=prompt_mass, prompt_tokens=prompt_len
        )

    def _lens(self, hidden_states: Any, final_logits: Any) -> tuple[str, ...] | None:
        """Top-1 token per layer through the final norm + lm_head."""
        import torch

        if not hidden_states:
            return None
        # hidden_states = (embeddings, layer 1 .. layer L); HF may store layer L already
        # normed, so the last entry uses the model's own logits instead of renorming it.
        inner = hidden_states[1:-1]
        ids: list[int] = []
        if inner:
            h = torch.stack([x[0, -1] for x in inner])
            ids = self._head(self._norm(h)).argmax(-1).tolist()
        ids.append(int(torch.argmax(final_logits)))
        return tuple(alt_text(self.token_bytes(i)) for i in ids)

    def close(self) -> None:
        """Free the model (waits for a running stream to finish)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.model = None
            self.loaded.model = None
            import gc

            gc.collect()
            with contextlib.suppress(Exception):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- benchmark

_BENCH_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def _deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Approximate in-memory bytes of a nested structure of lists/tuples/dataclasses."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, list | tuple):
        size += sum(_deep_size(x, seen) for x in obj)
    elif hasattr(obj, "__slots__"):
        size += sum(_deep_size(getattr(obj, a), seen) for a in obj.__slots__ if hasattr(obj, a))
    return size


def _bench_one(
    mode: str, tokens: int, model: str | None, threads: int | None, cache_dir: str | None
) -> dict[str, Any]:
    """One benchmark mode in this process: load, warm up, generate ``tokens`` greedily."""
    import resource

    from .base import Message, Sampling

    att = mode in ("attention", "full")
    lens = mode in ("lens", "full")
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401  (imported up front so load_s is the load alone)

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    be = TransformersBackend(model, attention=att, threads=threads, cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    # EOS is banned so every run produces exactly ``tokens`` tokens.
    req = GenerationRequest(
        messages=(Message("user", _BENCH_PROMPT),),
        sampling=Sampling(temperature=0, max_tokens=tokens),
        attention=att,
        logit_lens=lens,
        logit_bias=dict.fromkeys(be.eos_token_ids, float("-inf")),
    )
    warm = GenerationRequest(
        messages=req.messages, sampling=Sampling(temperature=0, max_tokens=4), attention=att
    )
    list(be.stream(warm))
    evs = list(be.stream(req))
    fin = evs[-1]
    if not isinstance(fin, FinishEvent) or fin.reason == "error":
        raise BackendError(f"benchmark generation failed: {getattr(fin, 'message', fin)}")
    toks = [e for e in evs if isinstance(e, TokenEvent)]
    end = _rss_mb()
    res: dict[str, Any] = {
        "mode": mode,
        "tokens": len(toks),
        "tokens_per_s": round(fin.timings.get("tokens_per_s", 0.0), 2),
        "prompt_tokens": fin.usage.get("prompt_tokens"),
        "import_s": round(import_s, 2),
        "load_s": round(load_s, 2),
        "load_source": be.loaded.source,
        "rss_loaded_mb": rss_loaded["rss"],
        "rss_end_mb": end["rss"],
        "rss_end_anon_mb": end["anon"],
        "rss_end_file_mb": end["file"],
        # Includes the mmap'd safetensors pages (file-backed, shared, reclaimable).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }
    res["tok_s"] = res["tokens_per_s"]  # the name thoughtform.bench.backend reads
    summaries = [e.attention for e in toks if e.attention is not None]
    if summaries:
        res["attention_json_bytes_per_token"] = round(
            sum(len(json.dumps(a.to_dict(), separators=(",", ":"))) for a in summaries)
            / len(summaries)
        )
        res["attention_bytes_per_token"] = res["attention_json_bytes_per_token"]
        res["attention_mem_bytes_per_token"] = round(
            sum(_deep_size(a) for a in summaries) / len(summaries)
        )
    return res


def bench_transformers(
    tokens: int = 64,
    attention: bool | None = None,
    model: str | None = None,
    modes: tuple[str, ...] = ("plain", "attention", "full"),
    threads: int | None = None,
    cache_dir: str | None = None,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Tok/s, load time and peak RSS of greedy generation with EOS banned.

    With ``attention`` set, one mode runs in this process (the caller isolates it) and the
    flat result has ``tok_s``, ``peak_rss_mb`` and, with attention, ``attention_bytes_per_token``
    (compact JSON). Otherwise each of ``modes`` (``plain`` = SDPA, ``attention`` = eager with
    capture, ``lens``, ``full`` = attention + lens) runs in a fresh subprocess so peak RSS is
    per mode, and the result maps ``modes`` to those dicts."""
    import subprocess

    if attention is not None:
        mode = "attention" if attention else "plain"
        return _bench_one(mode, tokens, model, threads, cache_dir)

    results: dict[str, Any] = {"tokens": tokens, "model": model or "embedded", "modes": {}}
    for mode in modes:
        code = (
            "import json,sys;from thoughtform.backends.transformers import _bench_one as b;"
            "print(json.dumps(b(*json.loads(sys.argv[1]))))"
        )
        args = json.dumps([mode, tokens, model, threads, cache_dir])
        proc = subprocess.run(
            [sys.executable, "-c", code, args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            results["modes"][mode] = {"error": tail}
            continue
        results["modes"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results
