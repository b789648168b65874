"""Control vectors in llama.cpp's GGUF format: read, write, and the flat buffer for libllama.

The format is what ``llama-server --control-vector`` loads (``common_control_vector_load_one``):
tensors named ``direction.<layer>``, each F32, 1-D, all of one length ``n_embd``, layer >= 1
(llama.cpp never steers layer 0); a file that breaks any of these is skipped whole there, so
:func:`load_control_vector` refuses it here. ``direction.<il>`` is added to the output of
0-based decoder block ``il`` (after its FFN residual add), for every token decoded while set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
_DIRECTION = re.compile(r"direction\.(\d+)")


class VectorFileError(ValueError):
    """A control-vector file cannot be read or breaks llama.cpp's rules; names file and tensor."""


@dataclass(frozen=True, eq=False)
class ControlVector(Mapping[int, np.ndarray]):
    """One direction per steered layer (``layer -> float32[n_embd]``), as llama.cpp reads it."""

    directions: dict[int, np.ndarray]
    model_hint: str = ""
    name: str = ""
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ValueError(f"{self.name or 'control vector'}: no directions")
        sizes = {int(v.shape[0]) for v in self.directions.values()}
        if len(sizes) != 1 or any(v.ndim != 1 for v in self.directions.values()):
            raise ValueError(f"{self.name or 'control vector'}: directions differ in shape")
        if min(self.directions) < 1:
            raise ValueError(f"{self.name or 'control vector'}: layer 0 cannot be steered")
        fixed = {
            int(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in self.directions.items()
        }
        object.__setattr__(self, "directions", dict(sorted(fixed.items())))

    def __eq__(self, other: object) -> bool:
        """Same layers with bit-equal directions (hint and name included)."""
        if not isinstance(other, ControlVector):
            return NotImplemented
        return (
            self.model_hint == other.model_hint
            and self.name == other.name
            and self.layers == other.layers
            and all(np.array_equal(self[k], other[k]) for k in self.layers)
        )

    __hash__ = None  # type: ignore[assignment]

    def __getitem__(self, layer: int) -> np.ndarray:
        """The direction added at ``layer``."""
        return self.directions[layer]

    def __iter__(self) -> Iterator[int]:
        """Steered layers, ascending."""
        return iter(self.directions)

    def __len__(self) -> int:
        """How many layers are steered."""
        return len(self.directions)

    @property
    def n_embd(self) -> int:
        """Length of every direction (the model's hidden size)."""
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        """Steered layers, ascending."""
        return tuple(self.directions)

    def norms(self) -> dict[int, float]:
        """The L2 norm of each layer's direction."""
        return {k: float(np.linalg.norm(v)) for k, v in self.directions.items()}


def write_control_vector(
    cv: ControlVector, path: str | Path, model_hint: str | None = None
) -> Path:
    """Write ``cv`` as a llama.cpp control-vector GGUF (what repeng's ``export_gguf`` writes)."""
    import gguf

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(p), ARCH)  # sets general.architecture
    w.add_string(KEY_MODEL_HINT, model_hint if model_hint is not None else cv.model_hint)
    # repeng writes the number of direction tensors here; llama.cpp does not read it.
    w.add_uint32(KEY_LAYER_COUNT, len(cv))
    for layer, d in cv.directions.items():
        w.add_tensor(f"direction.{layer}", np.ascontiguousarray(d, dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return p


def _field_value(reader: object, key: str) -> object:
    f = reader.get_field(key)  # type: ignore[attr-defined]
    if f is None:
        return None
    try:
        return f.contents()
    except (IndexError, ValueError, TypeError):
        return None


def load_control_vector(path: str | Path) -> ControlVector:
    """Read a control-vector GGUF, refusing what llama.cpp's loader would skip."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise VectorFileError(f"{p}: no such control-vector file")
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise VectorFileError(f"{p}: not a GGUF file ({first})") from None
    arch = _field_value(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        raise VectorFileError(f"{p}: general.architecture is {arch!r}, not {ARCH!r}")
    directions: dict[int, np.ndarray] = {}
    n_embd: int | None = None
    for t in reader.tensors:
        m = _DIRECTION.fullmatch(t.name)
        if m is None:
            raise VectorFileError(f"{p}: tensor {t.name!r} is not named direction.<layer>")
        layer = int(m.group(1))
        if layer == 0:
            raise VectorFileError(f"{p}: {t.name}: layer 0 is never steered by llama.cpp")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorFileError(f"{p}: {t.name}: type {t.tensor_type.name}, must be F32")
        shape = [int(x) for x in t.shape]
        if len(shape) != 1:
            raise VectorFileError(f"{p}: {t.name}: shape {shape}, must be 1-D")
        if n_embd is None:
            n_embd = shape[0]
        elif shape[0] != n_embd:
            raise VectorFileError(f"{p}: {t.name}: length {shape[0]}, others have {n_embd}")
        if layer in directions:
            # llama.cpp sums repeated layers within a file; so do we.
            directions[layer] = directions[layer] + np.array(t.data, dtype=np.float32)
        else:
            directions[layer] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not directions:
        raise VectorFileError(f"{p}: no direction tensors")
    hint = _field_value(reader, KEY_MODEL_HINT)
    return ControlVector(
        directions, model_hint=str(hint) if hint is not None else "", name=p.stem, path=p
    )


def cvec_buffer(
    vectors: Sequence[tuple[ControlVector, float]], n_embd: int, n_layer: int
) -> tuple[np.ndarray, int, int]:
    """The flat buffer ``llama_set_adapter_cvec`` takes, with its inclusive layer range.

    ``n_embd`` floats per layer starting at layer 1 (layer ``il`` at ``(il - 1) * n_embd``), each
    vector's direction x its scale summed per layer exactly as llama.cpp's own loader does (in
    float32). Returns ``(buffer, il_start, il_end)``; a buffer of length 0 with ``-1, -1`` when
    nothing is to be applied (pass ``data=NULL`` to clear).
    """
    if n_embd < 1 or n_layer < 2:
        raise ValueError(f"need n_embd >= 1 and n_layer >= 2, got {n_embd} and {n_layer}")
    used = [(cv, float(s)) for cv, s in vectors if float(s) != 0.0]
    for cv, _ in used:
        label = str(cv.path or cv.name or "control vector")
        if cv.n_embd != n_embd:
            raise ValueError(f"{label}: directions have length {cv.n_embd}, the model {n_embd}")
        bad = [k for k in cv.layers if not 1 <= k < n_layer]
        if bad:
            raise ValueError(f"{label}: layer {bad[0]} outside 1..{n_layer - 1} of this model")
    if not used:
        return np.zeros(0, dtype=np.float32), -1, -1
    il_start = min(min(cv.layers) for cv, _ in used)
    il_end = max(max(cv.layers) for cv, _ in used)
    buf = np.zeros(n_embd * il_end, dtype=np.float32)
    for cv, s in used:
        scale = np.float32(s)
        for layer, d in cv.directions.items():
            off = (layer - 1) * n_embd
            buf[off : off + n_embd] += d * scale
    return buf, il_start, il_end
