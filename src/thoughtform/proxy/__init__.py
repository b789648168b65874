"""An OpenAI-compatible proxy that adds voice structure, steering and recording to any app.

``thoughtform proxy`` sits between a chat app (Open WebUI, SillyTavern, LM Studio, a script using
the ``openai`` SDK) and a model: the embedded one (llama.cpp in process) or any OpenAI-compatible
server (vLLM, llama.cpp, Ollama) through the ``openai`` backend. Every reply runs through
:class:`~thoughtform.generate.Generation` (backend -> parser -> trace): clients get the content
unchanged plus ``delta.thoughtform`` (voice, segment), voices folded as reasoning on request,
steering from the request body, and every exchange is recorded in the workbench's SQLite.
"""

from __future__ import annotations

from .config import ProxyConfig, ProxyConfigError

__all__ = ["ProxyConfig", "ProxyConfigError", "create_app"]


def create_app(config: ProxyConfig) -> object:
    """The proxy as an ASGI application (see :mod:`thoughtform.proxy.app`)."""
    from .app import create_app as _create

    return _create(config)
