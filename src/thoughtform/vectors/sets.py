"""A directory of voice vectors: ``<Voice>.gguf`` per voice plus ``vectors.json``; shipped sets."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cvec import ControlVector, VectorFileError, load_control_vector

META = "vectors.json"
FORMAT = 1
DEFAULT_STRENGTH = 1.0
SHIPPED_ROOT = Path(__file__).parent  # shipped sets live in subdirectories with a vectors.json


@dataclass
class VectorSet:
    """Voice name -> control vector, with the training facts and default strengths."""

    path: Path
    vectors: dict[str, ControlVector]
    meta: dict[str, Any] = field(default_factory=dict)

    def default_strength(self, voice: str) -> float:
        """The strength vectors.json suggests for ``voice`` (1.0 when it says nothing)."""
        s = self.meta.get("default_strengths", {}).get(voice)
        return (
            float(s)
            if isinstance(s, (int, float)) and not isinstance(s, bool)
            else DEFAULT_STRENGTH
        )

    def strength(self, voice: str, voices: Any = None) -> float:
        """The strength for ``voice``: the voice set's ``vector`` field if set, else the default."""
        if voices is not None:
            v = voices.get(voice)
            if v is not None and v.vector is not None:
                return float(v.vector)
        return self.default_strength(voice)

    def get(self, voice: str) -> ControlVector | None:
        """The vector for ``voice`` (case-insensitive), if any."""
        if voice in self.vectors:
            return self.vectors[voice]
        low = voice.casefold()
        return next((cv for k, cv in self.vectors.items() if k.casefold() == low), None)


def shipped_dir(name: str = "seed") -> Path:
    """Directory of a vector set shipped in the package (``seed``: the seed voices)."""
    return SHIPPED_ROOT / name


def seed_vectors_dir() -> Path | None:
    """The shipped seed voices' vector directory, or None if this install lacks it."""
    d = shipped_dir("seed")
    return d if (d / META).is_file() else None


def shipped_sets() -> list[str]:
    """Names of the vector sets installed with the package."""
    return sorted(p.name for p in SHIPPED_ROOT.iterdir() if (p / META).is_file())


def resolve_dir(spec: str | Path) -> Path:
    """A shipped set's name (``seed``) or a directory path -> the directory."""
    s = str(spec)
    if "/" not in s and "\\" not in s and (SHIPPED_ROOT / s / META).is_file():
        return SHIPPED_ROOT / s
    p = Path(s).expanduser()
    if not p.is_dir():
        known = ", ".join(shipped_sets()) or "none"
        raise VectorFileError(f"{s}: no such vector directory (shipped sets: {known})")
    return p


def read_meta(directory: Path) -> dict[str, Any]:
    """``vectors.json`` of a directory ({} when absent); errors name the file."""
    p = directory / META
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VectorFileError(f"{p}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise VectorFileError(f"{p}: must hold a JSON object")
    return data


def load_vector_set(spec: str | Path) -> VectorSet:
    """Load every ``<Voice>.gguf`` of a directory (or shipped set) with its ``vectors.json``."""
    d = resolve_dir(spec)
    meta = read_meta(d)
    files: Mapping[str, Any] = (
        meta.get("voices", {}) if isinstance(meta.get("voices"), dict) else {}
    )
    vectors: dict[str, ControlVector] = {}
    if files:
        for voice, info in files.items():
            name = info.get("file", f"{voice}.gguf") if isinstance(info, dict) else f"{voice}.gguf"
            vectors[voice] = load_control_vector(d / name)
    else:
        for p in sorted(d.glob("*.gguf")):
            vectors[p.stem] = load_control_vector(p)
    if not vectors:
        raise VectorFileError(f"{d}: no voice vectors (<Voice>.gguf) in this directory")
    return VectorSet(d, vectors, meta)


# What `vectors strengths` accepts (the voice set's `vector:` field allows the same range).
MAX_STRENGTH = 4.0


def set_default_strengths(spec: str | Path, strengths: Mapping[str, float]) -> dict[str, float]:
    """Write ``strengths`` (voice -> strength) into a vector set's ``vectors.json`` as the
    defaults it ships with (voices not named keep theirs); returns the defaults now in force.

    The file is rewritten the way training writes it (same key order, ``indent=1``), so a
    rebuild that trains and then sets the same strengths is byte-identical."""
    vset = load_vector_set(spec)
    meta = read_meta(vset.path)
    if not meta:
        raise VectorFileError(f"{vset.path}: no {META} to hold default strengths")
    defaults = dict(meta.get("default_strengths") or {})
    for voice, s in strengths.items():
        name = next((k for k in vset.vectors if k.casefold() == voice.casefold()), None)
        if name is None:
            raise VectorFileError(
                f"{voice}: no vector for this voice in {vset.path} (has: {', '.join(vset.vectors)})"
            )
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not abs(s) <= MAX_STRENGTH:
            raise VectorFileError(f"{voice}: strength {s!r} is not a number in -4..4")
        defaults[name] = float(s)
    meta["default_strengths"] = {k: defaults[k] for k in vset.vectors if k in defaults}
    (vset.path / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return dict(meta["default_strengths"])


def strengths_from_eval(path: str | Path) -> dict[str, float]:
    """The ``default_strength`` map of an ``eval vectors --json`` result file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VectorFileError(f"{p}: cannot read: {e}") from None
    got = data.get("default_strength") if isinstance(data, dict) else None
    if not isinstance(got, dict) or not got:
        raise VectorFileError(f"{p}: default_strength: an eval vectors --json object is required")
    return {str(k): v for k, v in got.items()}
