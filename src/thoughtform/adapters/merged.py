"""The embedded model with the shipped voices adapter merged in: built once, cached, reused.

llama.cpp applies a LoRA at run time as two extra small matrix products per adapted weight, which
decodes ``embedded-voices`` at 0.6-0.85x the base model's speed (measured). Merging once removes
that: each adapted base tensor is dequantized (``gguf.quants.dequantize``), ``scale * B @ A`` is
added (the adapter's ``B`` already carries llama.cpp's q/k row permutation, see
``train/export.py``), the result is written as an f16 GGUF with every metadata and tokenizer key of
the base, and llama.cpp's own ``llama_model_quantize`` quantizes it.

The target type is Q8_0, not the base's Q4_1 (measured on 6 prompts x 48 greedy tokens of the
runtime-LoRA model, teacher-forced, mean per-token KL(runtime LoRA || model)): Q4_1 1.88 (the base
without any adapter: 2.09), Q5_1 1.00, Q5_0 0.09, Q6_K 0.013, Q8_0 0.005, f16 0.003. The adapter's
delta (mean |delta| 0.0008 against mean |W| 0.19) is far below a Q4_1 step, and the base's weights
already sit on the Q4_1 grid, so requantizing rounds almost every weight back to where it was.
Q8_0 decodes as fast as the Q4_1 base on this CPU (1.07x, 5 interleaved rounds).

Only numpy, ``gguf`` and ``llama_cpp`` are needed (no torch). The cache lives in
``user_cache_dir()/merged``, named by the sha256 of base + adapter + format version + type; files
appear by rename (never half-written), a build lock keeps two processes from building at once, and a
sidecar JSON holds the merged file's own sha256 so that a damaged file is rebuilt.
``THOUGHTFORM_NO_MERGE=1`` turns merging off (the runtime LoRA is used).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..models import embedded_gguf_path, user_cache_dir
from . import voices_adapter_path

# Bump when the merge itself changes: old cache entries are then ignored.
FORMAT_VERSION = 1
MERGED_TYPE = "Q8_0"
NO_MERGE_ENV = "THOUGHTFORM_NO_MERGE"
CACHE_SUBDIR = "merged"
_DIGESTS = "digests.json"


class MergeError(ValueError):
    """The base model and the adapter cannot be merged (or the result is unusable)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its ggml type, its dims (ggml order) and its raw data."""

    name: str
    type: int
    ne: tuple[int, ...]
    data: np.ndarray  # quantized: uint8 (rows, bytes per row); float: numpy shape reversed(ne)


@dataclass(frozen=True)
class GGUFFile:
    """Metadata (key, value type, element type, value) and tensors of a GGUF file, in order."""

    kv: list[tuple[str, int, int | None, Any]]
    tensors: list[GGUFTensor]

    def get(self, key: str) -> Any:
        """The value of metadata key ``key`` (strings as bytes), or None."""
        for k, _, _, v in self.kv:
            if k == key:
                return v
        return None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a little-endian GGUF file; tensor data are views of a read-only memory map.

    ``gguf.GGUFReader`` builds a numpy memmap view per array element: the embedded model's
    49152-token vocabulary and 48900 merges take it 3-10 s; this reads them in ~0.1 s.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise MergeError(f"{path}: not a GGUF file (empty)") from None
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        s = bytes(buf[pos : pos + n])
        pos += n
        return s

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return string()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise MergeError(f"{path}: unknown GGUF value type {vtype}")
        return take(fmt)

    try:
        if bytes(buf[:4]) != b"GGUF":
            raise MergeError(f"{path}: not a GGUF file")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise MergeError(f"{path}: unsupported GGUF version {version} (or big-endian)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        kv: list[tuple[str, int, int | None, Any]] = []
        for _ in range(n_kv):
            key = string().decode("utf-8")
            vtype = take("<I")
            if vtype != _ARRAY:
                kv.append((key, vtype, None, value(vtype)))
                continue
            sub, count = take("<I"), take("<Q")
            fmt = _SCALARS.get(sub)
            if fmt is not None:  # numbers: one vectorized read
                dt = np.dtype(fmt)
                items: Any = np.frombuffer(buf, dt, count, pos).tolist()
                pos += dt.itemsize * count
            else:
                items = [value(sub) for _ in range(count)]
            kv.append((key, vtype, sub, items))
        infos = []
        for _ in range(n_tensors):
            name = string().decode("utf-8")
            ne = tuple(take("<Q") for _ in range(take("<I")))
            infos.append((name, take("<I"), ne, take("<Q")))
        align = next((v for k, _, _, v in kv if k == "general.alignment"), 32)
        start = pos + (-pos % align)
        tensors = []
        for name, ttype, ne, off in infos:
            qtype = GGMLQuantizationType(ttype)
            block, size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(ne))
            nbytes = n // block * size
            if start + off + nbytes > len(buf):
                raise MergeError(f"{path}: tensor {name} runs past the end of the file")
            raw = np.frombuffer(buf, np.uint8, nbytes, start + off)
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                fdt = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
                data = raw.view(fdt).reshape(tuple(reversed(ne)))
            else:
                data = raw.reshape(n // ne[0], ne[0] // block * size)
            tensors.append(GGUFTensor(name, ttype, ne, data))
    except (struct.error, UnicodeDecodeError, ValueError, KeyError) as e:
        if isinstance(e, MergeError):
            raise
        raise MergeError(f"{path}: malformed GGUF ({e})") from None
    return GGUFFile(kv, tensors)


def lora_scale(adapter: GGUFFile, rank: int) -> float:
    """llama.cpp's scale of a LoRA at user scale 1: ``alpha / rank``, or 1 when alpha is 0."""
    alpha = float(adapter.get("adapter.lora.alpha") or 0.0)
    return alpha / rank if alpha else 1.0


def write_merged_f16(base: GGUFFile, adapter: GGUFFile, out: str | Path) -> int:
    """Write base + ``scale * B @ A`` as a GGUF: adapted weights f16, the rest as in the base
    (types and bytes), every metadata key copied; return how many tensors were adapted."""
    import gguf
    from gguf.quants import dequantize

    if adapter.get("adapter.type") != b"lora":
        raise MergeError("the adapter is not a GGUF LoRA (adapter.type != lora)")
    arch = base.get("general.architecture")
    if not isinstance(arch, bytes) or adapter.get("general.architecture") != arch:
        raise MergeError("the adapter's architecture is not the base model's")
    lora = {t.name: t.data for t in adapter.tensors}
    w = gguf.GGUFWriter(str(out), arch=arch.decode("utf-8"))
    for key, vtype, sub, val in base.kv:
        # The writer adds the architecture itself; the quantizer rewrites the file type.
        if key in ("general.architecture", "general.file_type"):
            continue
        if key == "general.alignment":
            w.add_custom_alignment(int(val))  # the writer must pad to it, not just record it
            continue
        if vtype == _ARRAY and not val:
            raise MergeError(f"base metadata {key} is an empty array (cannot be written)")
        sub_type = None if sub is None else gguf.GGUFValueType(sub)  # UINT8 is 0
        w.add_key_value(key, val, gguf.GGUFValueType(vtype), sub_type)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    used = 0
    for t in base.tensors:
        a, b = lora.get(f"{t.name}.lora_a"), lora.get(f"{t.name}.lora_b")
        if a is None or b is None:
            qtype = gguf.GGMLQuantizationType(t.type)
            raw = t.type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            w.add_tensor(t.name, t.data, raw_dtype=qtype if raw else None)
            continue
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        weight = np.asarray(dequantize(t.data, gguf.GGMLQuantizationType(t.type)), np.float32)
        if b32.shape[1] != a32.shape[0] or weight.shape != (b32.shape[0], a32.shape[1]):
            raise MergeError(f"{t.name}: LoRA shapes {b32.shape} @ {a32.shape} != {weight.shape}")
        # einsum, not `@`: for these rank-8 products OpenBLAS's threads cost 29 ms each on a
        # busy 2-core machine (6 s for the model) against einsum's single-threaded 5 ms.
        weight += np.einsum("ik,kj->ij", b32 * lora_scale(adapter, a32.shape[0]), a32)
        w.add_tensor(t.name, weight.astype(np.float16))
        used += 2
    if used != len(lora):
        raise MergeError(f"the adapter has {len(lora) - used} tensors the base model lacks")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return used // 2


def quantize(src: str | Path, out: str | Path, qtype: str = MERGED_TYPE) -> None:
    """Quantize GGUF ``src`` to ``out`` with llama.cpp's ``llama_model_quantize``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise MergeError(f"llama.cpp has no quantization type {qtype!r}")
    params.ftype = ftype
    params.allow_requantize = True  # non-adapted tensors may arrive quantized to another type
    # llama.cpp logs every tensor at INFO; llama-cpp-python's callback prints what its logger's
    # level lets through, so raise it for the call and put it back.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(out).encode(), ctypes.byref(params)
        )
    finally:
        log.setLevel(level)
    if rc != 0:
        raise MergeError(f"llama_model_quantize failed (code {rc})")


def build_merged(base: str | Path, adapter: str | Path, out: str | Path) -> dict[str, Any]:
    """Merge ``adapter`` into ``base`` and write the quantized model at ``out`` (via a temporary
    name in the same directory, then a rename); return the build's facts for the sidecar."""
    t0 = time.perf_counter()
    out = Path(out)
    base_file, adapter_file = read_gguf(base), read_gguf(adapter)
    fd, f16 = tempfile.mkstemp(prefix=".f16-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        adapted = write_merged_f16(base_file, adapter_file, f16)
        del base_file, adapter_file  # release the memory maps before the quantizer reads
        quantize(f16, tmp)
        merged = read_gguf(tmp)
        if not merged.tensors:
            raise MergeError("the quantized model has no tensors")
        del merged
        digest = _sha256(Path(tmp))
        os.replace(tmp, out)
    finally:
        for p in (f16, tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    st = out.stat()
    return {
        "sha256": digest,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ino": st.st_ino,
        "adapted_tensors": adapted,
        "build_s": round(time.perf_counter() - t0, 2),
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON by rename, so that readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_digest(path: Path, cache: Path) -> str:
    """sha256 of ``path``, remembered in ``cache`` by (size, mtime, inode): hashing the base and
    the adapter costs ~0.3 s per model load here, the memo ~1 ms."""
    path = path.resolve()
    memo_path = cache / _DIGESTS
    memo = _read_json(memo_path) or {}
    key = _stat_key(path)
    hit = memo.get(str(path))
    if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
        return str(hit["sha256"])
    digest = _sha256(path)
    memo[str(path)] = {"stat": key, "sha256": digest}
    with contextlib.suppress(OSError):  # a lost memo only costs a re-hash next time
        _write_json(memo_path, memo)
    return digest


def cache_key(base_sha256: str, adapter_sha256: str, qtype: str = MERGED_TYPE) -> str:
    """The cache key of a merged model: both inputs' hashes, the format version and the type."""
    text = f"thoughtform-merged v{FORMAT_VERSION} {qtype} {base_sha256} {adapter_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()


def _valid(path: Path, key: str) -> bool:
    """Whether ``path`` is a finished build for ``key`` with the bytes it was built with."""
    side = _read_json(path.with_name(path.name + ".json"))
    if side is None or side.get("key") != key or not path.is_file():
        return False
    stat = _stat_key(path)
    if [side.get("size"), side.get("mtime_ns"), side.get("ino")] == stat:
        return True
    # Touched since the build (copied, restored, damaged): trust only the same bytes.
    if stat[0] != side.get("size") or _sha256(path) != side.get("sha256"):
        return False
    side.update(size=stat[0], mtime_ns=stat[1], ino=stat[2])
    with contextlib.suppress(OSError):
        _write_json(path.with_name(path.name + ".json"), side)
    return True


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock on ``cache`` for the duration of a build (POSIX; elsewhere none: two
    builds then race harmlessly, each renaming a whole file into place)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(cache / ".build.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merged_model(
    base: str | Path, adapter: str | Path, cache: str | Path, build: bool = True
) -> Path | None:
    """The cached merge of ``adapter`` into ``base`` under ``cache``: built when missing, stale
    or damaged (if ``build``), else None. Raises MergeError/OSError when building fails."""
    base, adapter, cache = Path(base), Path(adapter), Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(file_digest(base, cache), file_digest(adapter, cache))
    out = cache / f"{base.stem}+{adapter.stem}-{MERGED_TYPE.lower()}-{key[:16]}.gguf"
    if _valid(out, key):
        return out
    if not build:
        return None
    with _build_lock(cache):
        if _valid(out, key):  # another process built it while this one waited
            return out
        print(
            f"thoughtform: merging {adapter.name} into {base.name} (once; cached in {cache})",
            file=sys.stderr,
        )
        facts = build_merged(base, adapter, out)
        facts.update(key=key, format=FORMAT_VERSION, type=MERGED_TYPE)
        facts.update(base=str(base), adapter=str(adapter))
        _write_json(out.with_name(out.name + ".json"), facts)
    return out


def merged_voices_model(build: bool = True) -> Path | None:
    """The embedded model with the shipped voices adapter merged in (built on first use), or
    None (runtime LoRA instead) when ``THOUGHTFORM_NO_MERGE`` is set or the merge fails."""
    if os.environ.get(NO_MERGE_ENV, "").strip() not in ("", "0"):
        return None
    try:
        return merged_model(
            embedded_gguf_path(), voices_adapter_path(), user_cache_dir() / CACHE_SUBDIR, build
        )
    # Generation must never fail because of this optimisation: whatever went wrong (no gguf
    # package, a full disk, an odd model file), say so once and fall back to the runtime LoRA.
    except Exception as e:
        print(
            f"thoughtform: cannot use a merged embedded-voices model ({type(e).__name__}: {e});"
            " using the runtime LoRA",
            file=sys.stderr,
        )
        return None
