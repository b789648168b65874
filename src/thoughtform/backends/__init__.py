"""Backends: built-ins registered explicitly, third-party ones via the ``thoughtform.backends``
entry-point group. Heavy imports happen inside each backend module, only when it is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .base import (
    Backend,
    BackendError,
    Capabilities,
    FinishEvent,
    GenerationRequest,
    Message,
    Sampling,
    StreamEvent,
    TokenEvent,
)

__all__ = [
    "BUILTIN",
    "Backend",
    "BackendError",
    "Capabilities",
    "FinishEvent",
    "GenerationRequest",
    "Message",
    "Sampling",
    "StreamEvent",
    "TokenEvent",
    "available_backends",
    "create_backend",
]

# name -> "module:factory"; the module is imported only when the backend is created.
BUILTIN: dict[str, str] = {
    "llamacpp": "thoughtform.backends.llamacpp:LlamaCppBackend",
    "openai": "thoughtform.backends.openai:OpenAIBackend",
    "transformers": "thoughtform.backends.transformers:TransformersBackend",
    "replay": "thoughtform.backends.replay:ReplayBackend",
}

# Which optional distribution each built-in needs, for a helpful error message.
EXTRA: dict[str, str] = {"llamacpp": "llama", "transformers": "hf", "openai": "", "replay": ""}


def _load(target: str) -> Callable[..., Backend]:
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="thoughtform.backends")}


def available_backends() -> list[str]:
    """Names of built-in and installed third-party backends."""
    return sorted(set(BUILTIN) | set(_plugins()))


def create_backend(name: str, **options: Any) -> Backend:
    """Create backend ``name`` with its options; raise BackendError with a one-line reason."""
    if name in BUILTIN:
        try:
            factory = _load(BUILTIN[name])
        except ImportError as e:
            extra = EXTRA.get(name)
            hint = f" (pip install 'thoughtform[{extra}]')" if extra else ""
            raise BackendError(f"backend {name!r} is not installed: {e.name or e}{hint}") from None
        return factory(**options)
    plugins = _plugins()
    if name in plugins:
        return plugins[name].load()(**options)
    raise BackendError(f"unknown backend {name!r} (available: {', '.join(available_backends())})")
