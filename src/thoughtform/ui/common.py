"""What every workbench panel shares: its asset files, toast-safe text, the request's user, and
the one way a user's mistake becomes a toast (``fail``)."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import gradio as gr


def asset(name: str) -> str:
    """The text of one of the workbench's own asset files."""
    return resources.files("thoughtform.ui").joinpath("assets", name).read_text(encoding="utf-8")


def plain(msg: object, limit: int = 500) -> str:
    """A message safe to show in a toast whether it is rendered as text or as HTML."""
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", str(msg))[:limit]
    return s.replace("&", "＆").replace("<", "‹").replace(">", "›")


def fail(e: Exception) -> Exception:
    """``e`` as the toast Gradio shows the user (one safe line, no traceback in the log)."""
    return gr.Error(plain(e), print_exception=False)


def request_user(request: Any) -> str | None:
    """The logged-in user of a request (None without a login): ``gr.Request.username`` in event
    handlers; in ``gr.HTML`` server functions Gradio passes the raw Starlette request, whose
    login cookie maps to the user the way Gradio's own ``/token`` route reads it."""
    if request is None:
        return None
    if isinstance(request, gr.Request):
        user = request.username
        return user if isinstance(user, str) and user else None
    app = getattr(request, "app", None)
    cookie_id = getattr(app, "cookie_id", None)
    tokens = getattr(app, "tokens", None)
    if cookie_id is None or not isinstance(tokens, dict):
        return None
    cookies = getattr(request, "cookies", None) or {}
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(
        f"access-token-unsecure-{cookie_id}"
    )
    user = tokens.get(token) if token else None
    return user if isinstance(user, str) and user else None


__all__ = ["asset", "fail", "plain", "request_user"]
