"""The local Gradio workbench (``thoughtform serve``); gradio is imported only when it starts."""

from __future__ import annotations

import os
from typing import Any

# Before any module of this package imports gradio: no telemetry from a local tool.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from .config import ServeConfig

__all__ = ["ServeConfig", "build_app", "serve"]


def build_app(config: ServeConfig) -> Any:
    """The workbench page as a ``gr.Blocks`` (see :mod:`thoughtform.ui.app`)."""
    from .app import build_app as _build

    return _build(config)


def serve(config: ServeConfig) -> None:
    """Start the workbench and block until interrupted (see :mod:`thoughtform.ui.app`)."""
    from .app import serve as _serve

    _serve(config)
