"""The Workbench tab: the board (one ``gr.HTML`` whose static template hosts the renderer,
``assets/workbench.js`` plus one ``assets/view-*.js`` per view, fed with small delta payloads
from ``stream.py``), its server functions, and the prompt with Send and Stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from .common import asset, request_user
from .service import MAX_WAITING_SENDS, Tab, Workbench, WorkbenchError
from .store import StoreError
from .stream import ends_in_error, error_event, payload

# The renderer: its core first, then one file per view (each registers itself with the core).
SCRIPTS = (
    "workbench.js",
    "steer.js",
    "loom.js",
    "view-chat.js",
    "view-lanes.js",
    "view-tokens.js",
    "view-stats.js",
    "view-attention.js",
)
STYLES = ("workbench.css", "steer.css", "loom.css")


def head() -> str:
    """The board's styles and scripts, inlined (the page loads no files of its own)."""
    return f"<style>{''.join(asset(n) for n in STYLES)}</style>" + "".join(
        f"<script>{asset(name)}</script>" for name in SCRIPTS
    )


def server_functions(wb: Workbench) -> list[Callable[..., Any]]:
    """What the board's JavaScript may call on the server (each scoped to the caller's own
    sessions and runs)."""

    def tf_events(args: list[Any], request: gr.Request) -> list[Any]:
        """Events a browser missed: [run_id, from, to] (only of the user's own runs)."""
        try:
            run_id, a, b = args
            return wb.run_events(str(run_id), int(a), int(b), user=request_user(request))
        except (TypeError, ValueError, WorkbenchError):
            return []

    def tf_attention(args: list[Any], request: gr.Request) -> dict[str, Any] | None:
        """Attention of one token: [session_id, global_index] (only in the user's sessions)."""
        try:
            sid, i = args
            return wb.attention(str(sid), int(i), user=request_user(request))
        except (TypeError, ValueError, WorkbenchError):
            return None

    def tf_steer(args: list[Any], request: gr.Request) -> dict[str, Any]:
        """A legend click: [session_id, "next"|"mute"|"state", voice] -> the steering state."""
        from .steer_view import steer_action

        try:
            sid, action, voice = args
        except (TypeError, ValueError):
            return {"ok": False, "error": "bad steering request", "muted": [], "next": None}
        return steer_action(wb, sid, action, voice, request_user(request))

    def tf_loom(args: list[Any], request: gr.Request) -> dict[str, Any]:
        """A loom call: [action, session_id, ...] (see ui/loom_view.loom_action)."""
        from .loom_view import loom_action

        return loom_action(wb, args, request_user(request))

    return [tf_events, tf_attention, tf_steer, tf_loom]


@dataclass
class ChatTab:
    """The Workbench tab's components."""

    wb: Workbench
    board: gr.HTML
    prompt: gr.Textbox
    send_btn: gr.Button
    stop_btn: gr.Button

    def wire(self, tab_state: gr.State, after_send: Callable[[Any], None]) -> None:
        """Register Send (Enter or the button) and Stop; ``after_send`` chains onto each send
        (the sidebar's session list follows the reply)."""
        wb = self.wb

        def on_send(
            text: str, tab: dict[str, Any], request: gr.Request
        ) -> Iterator[tuple[Any, Any, Any]]:
            if not isinstance(text, str) or not text.strip():
                yield gr.skip(), gr.skip(), gr.skip()
                return
            first = True
            last_tab: dict[str, Any] | None = None
            try:
                for pl, new_tab in wb.send(Tab.of(tab), text, request_user(request)):
                    # The tab changes once a reply that waited in the queue starts.
                    t = new_tab.to_dict()
                    # The box empties when the message is on its way, and gets the text back if
                    # the reply fails (the error is a block in the chat, not a passing toast).
                    box = "" if first else (text if ends_in_error(pl) else gr.skip())
                    yield pl, (t if t != last_tab else gr.skip()), box
                    first = False
                    last_tab = t
            except (WorkbenchError, StoreError) as e:
                sid = Tab.of(tab).sid
                yield payload(sid, [error_event(e)]), gr.skip(), (gr.skip() if first else text)

        def on_stop(tab: dict[str, Any], request: gr.Request) -> None:
            wb.stop(Tab.of(tab).sid, request_user(request))

        send_args: dict[str, Any] = {
            "fn": on_send,
            "inputs": [self.prompt, tab_state],
            "outputs": [self.board, tab_state, self.prompt],
            "show_progress": "hidden",
            "concurrency_id": "generate",
            # Replies wait their turn in the workbench's fair queue (one model at a time,
            # round-robin between users, each shown their place), not in Gradio's FIFO.
            "concurrency_limit": MAX_WAITING_SENDS,
        }
        after_send(self.prompt.submit(**send_args))
        after_send(self.send_btn.click(**send_args))
        self.stop_btn.click(
            on_stop, tab_state, None, show_progress="hidden", concurrency_limit=None
        )


def chat_tab(wb: Workbench) -> ChatTab:
    """Lay out the Workbench tab (call inside the page's ``gr.Tabs``)."""
    with gr.Tab("Workbench", id="workbench-tab"):
        board = gr.HTML(
            value="",
            html_template='<div class="tf-wb" id="tf-wb"></div>',
            js_on_load="window.thoughtform.mount(element, props, server, watch);",
            head=head(),
            server_functions=server_functions(wb),
            elem_id="workbench",
            apply_default_css=False,
        )
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                show_label=False,
                placeholder="Write a message (you can use voices too: [Doubt] …). Enter sends.",
                elem_id="prompt",
                lines=1,
                max_lines=6,
                scale=8,
                autofocus=True,
            )
            send_btn = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
    return ChatTab(wb, board, prompt, send_btn, stop_btn)


__all__ = ["SCRIPTS", "ChatTab", "chat_tab", "head", "server_functions"]
