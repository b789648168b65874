"""The workbench's Settings tab as pure functions: which telemetry switches a backend allows,
and what is wrong with a model name for a backend (one line, shown next to the field)."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..backends import BUILTIN, BackendError, Capabilities
from ..conversation import check_model
from ..models import MODEL_CHOICES


def declared_capabilities(backend: str) -> Capabilities | None:
    """What ``backend`` can do before it loads a model (a ``CAPABILITIES`` class attribute), or
    None when it does not say (or is not installed). Creating a backend to ask would load a
    model: seconds to minutes, for a switch."""
    target = BUILTIN.get(backend)
    if target is None:
        return None
    mod, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        return None
    caps = getattr(cls, "CAPABILITIES", None)
    return caps if isinstance(caps, Capabilities) else None


def telemetry_switches(backend: str) -> tuple[bool, bool]:
    """Whether the Attention and the Logit lens switches can be turned on for ``backend``."""
    caps = declared_capabilities(backend)
    return (bool(caps and caps.attention), bool(caps and caps.logit_lens))


def _looks_like_url(s: str) -> bool:
    return s.lower().startswith(("http://", "https://"))


def model_problem(backend: str, model: str | None, base_url: str | None = None) -> str:
    """What is wrong with ``model`` for ``backend``, in one line with what to do instead; ``""``
    when it fits. The rules are the library's (``conversation.check_model``); this adds the
    hint a person in the Settings tab needs (which backend a path or a URL belongs to)."""
    m = (model or "").strip()
    if _looks_like_url(m):
        if backend == "openai":
            return "the model field takes the server's model name; put the URL in Base URL"
        return (
            f"{m[:80]} is a server, not a model: choose the openai backend and put it in Base URL"
        )
    if backend == "openai":
        if m.lower().endswith(".gguf"):
            return "a .gguf file runs here, not on a server: choose the llamacpp backend"
        if m in MODEL_CHOICES:
            return f"{m} runs here, not on a server: choose llamacpp or transformers"
        if not (base_url or "").strip():
            return "the openai backend needs a base URL (e.g. http://127.0.0.1:8000/v1)"
        return ""
    if backend == "replay":
        return ""
    if backend == "llamacpp" and m and Path(m).expanduser().is_dir():
        return f"{m[:80]} is a model directory: choose the transformers backend"
    try:
        check_model(backend, m or None)
    except BackendError as e:
        return str(e)
    if m.lower().endswith(".gguf") and not Path(m).expanduser().is_file():
        return f"no such file: {m[:200]}"
    return ""


__all__ = ["declared_capabilities", "model_problem", "telemetry_switches"]
