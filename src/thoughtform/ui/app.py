"""The Gradio workbench: ``build_app(config) -> gr.Blocks`` and ``serve(config)``.

The page is composed of one module per panel, each laying out its components and wiring its
events: the sidebar (``sessions_view``), the Workbench tab (``chat_view``: the board that hosts
the renderer in ``assets/``), Voices (``voices_view``), Settings (``settings_view``), Dataset
(``dataset_view``), Compare (``compare_view``) and Council (``council_view``).
"""

from __future__ import annotations

import sys
from typing import Any

import gradio as gr

from .chat_view import chat_tab
from .common import asset, fail, plain, request_user
from .compare_view import compare_tab
from .config import ConfigError, ServeConfig, allowed_hosts, auth_users, check_exposure
from .dataset_view import dataset_tab
from .service import Workbench
from .sessions_view import sessions_sidebar
from .settings_view import settings_tab
from .voices_view import voices_from_rows, voices_from_yaml, voices_tab

__all__ = [
    "ServeConfig",
    "asset",
    "build_app",
    "fail",
    "plain",
    "request_user",
    "serve",
    "voices_from_rows",
    "voices_from_yaml",
]


def build_app(config: ServeConfig, workbench: Workbench | None = None) -> Any:
    """The workbench page as a ``gr.Blocks`` (call ``.queue().launch()`` or use :func:`serve`)."""
    from .council_view import council_tab  # voices taking turns

    wb = workbench or Workbench(config)
    with gr.Blocks(title="thoughtform", analytics_enabled=False, fill_width=True) as demo:
        sessions = sessions_sidebar(wb)
        with gr.Tabs():
            chat = chat_tab(wb)
            voices = voices_tab(wb)
            settings = settings_tab(wb)
            dataset = dataset_tab(wb, config)
            compare = compare_tab(config)
            wire_council = council_tab(wb, request_user)
        board, tab_state = chat.board, sessions.tab_state
        sessions.wire(demo, chat, voices, settings)  # first: the load event stays fn_index 0
        chat.wire(tab_state, sessions.after_send)
        settings.wire(tab_state, board)
        voices.wire(tab_state, board)
        dataset.wire()
        compare.wire()
        wire_council()  # after the page's own events
    demo.workbench = wb
    return demo


def launch_kwargs(config: ServeConfig) -> dict[str, Any]:
    """How :func:`serve` launches Gradio: no share link, no extra files, auth when given, and
    the Host/Origin guard in front of every route (``guard.py``)."""
    from starlette.middleware import Middleware

    from .guard import HostOriginGuard

    users = auth_users(config)
    return {
        "server_name": config.host,
        "server_port": config.port,
        "auth": users or None,
        # FastAPI(middleware=...) wraps the whole app Gradio builds, its API included.
        "app_kwargs": {
            "middleware": [Middleware(HostOriginGuard, allowed_hosts=allowed_hosts(config))]
        },
        # Static-file worker processes would serve files outside the guard: none.
        "num_workers": 0,
        "share": False,
        "allowed_paths": [],
        "ssr_mode": False,
        "mcp_server": False,
        "pwa": False,
        "inbrowser": False,
        "enable_monitoring": False,
        "show_error": True,
        "quiet": True,  # we print our own line (Gradio's suggests share=True, never used here)
    }


def serve(config: ServeConfig) -> None:
    """Start the workbench and block until interrupted."""
    try:
        warning = check_exposure(config)
    except ConfigError as e:
        raise SystemExit(f"thoughtform serve: {e}") from None
    if warning:
        print(warning, file=sys.stderr)
    wb = Workbench(config)
    demo = build_app(config, wb)
    demo.queue(default_concurrency_limit=1, max_size=64)
    host = f"[{config.host}]" if ":" in config.host else config.host
    users = len(auth_users(config))
    login = f", login: {users} user{'s' if users != 1 else ''}" if users else ""
    print(
        f"thoughtform workbench on http://{host}:{config.port}/  (sessions: {wb.store.path}{login})"
    )
    sys.stdout.flush()
    try:
        demo.launch(**launch_kwargs(config))
    finally:
        wb.close()
