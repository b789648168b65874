"""The Gradio workbench: ``build_app(config) -> gr.Blocks`` and ``serve(config)``.

Gradio lays out the page and carries events; one ``gr.HTML`` component with a static template
hosts the renderer (``assets/workbench.js`` and one ``assets/view-*.js`` per view), fed with
small delta payloads (``stream.py``).
"""

from __future__ import annotations

import os

# Before gradio is imported: no telemetry from a local tool.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import html
import re
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import gradio as gr

from ..voices import PRESETS, VoiceSet, VoiceSetError
from .config import (
    ConfigError,
    ServeConfig,
    allowed_hosts,
    auth_users,
    check_exposure,
    is_loopback,
)
from .export import ImportError_, import_file, reply_trace, safe_filename, session_markdown
from .service import BACKENDS, MAX_WAITING_SENDS, Tab, Workbench, WorkbenchError
from .settings_view import model_problem, telemetry_switches
from .store import StoreError, valid_session_id
from .stream import ends_in_error, error_event, info_event, payload
from .voices_view import VOICE_COLUMNS, add_row, remove_row, voices_from_rows, voices_from_yaml
from .voices_view import voice_rows as _voice_rows

__all__ = ["ServeConfig", "build_app", "serve"]

SETTING_KEYS = (
    "backend",
    "model",
    "base_url",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "seed",
    "alternatives",
    "voice_prompt",
    "system",
    "attention",
    "logit_lens",
    "structure",
)
SWITCHES = ("attention", "logit_lens")  # enabled only where the backend's capabilities say so
EXPORTS = ["Trace (JSONL)", "HTML report", "Markdown"]
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


def asset(name: str) -> str:
    """The text of one of the workbench's own asset files."""
    return resources.files("thoughtform.ui").joinpath("assets", name).read_text(encoding="utf-8")


def plain(msg: object, limit: int = 500) -> str:
    """A message safe to show in a toast whether it is rendered as text or as HTML."""
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", str(msg))[:limit]
    return s.replace("&", "＆").replace("<", "‹").replace(">", "›")


def _error(e: Exception) -> Exception:
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


def build_app(config: ServeConfig, workbench: Workbench | None = None) -> Any:
    """The workbench page as a ``gr.Blocks`` (call ``.queue().launch()`` or use :func:`serve`)."""
    wb = workbench or Workbench(config)

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

    head = (
        f"<style>{asset('workbench.css')}{asset('steer.css')}{asset('loom.css')}</style>"
        + "".join(f"<script>{asset(name)}</script>" for name in SCRIPTS)
    )

    with gr.Blocks(title="thoughtform", analytics_enabled=False, fill_width=True) as demo:
        tab_state = gr.State(Tab().to_dict())
        with gr.Sidebar(label="Sessions", open=True, width=300):
            session_dd = gr.Dropdown(
                label="Session", choices=[], elem_id="session", interactive=True
            )
            recorded_cb = gr.Checkbox(
                False,
                label="Recorded only (sessions thoughtform proxy wrote)",
                elem_id="recorded-only",
            )
            # Polls only while a recorded session is open (thoughtform proxy writes it).
            live_timer = gr.Timer(2.0, active=False)
            new_btn = gr.Button("New session", elem_id="new-session", size="sm")
            title_tb = gr.Textbox(label="Name", elem_id="session-title", max_lines=1)
            with gr.Row():
                rename_btn = gr.Button("Rename", elem_id="rename", size="sm")
                delete_btn = gr.Button("Delete", elem_id="delete", size="sm", variant="stop")
            with gr.Accordion("Export", open=False):
                export_kind = gr.Radio(
                    EXPORTS, value=EXPORTS[0], label="Format", elem_id="export-kind"
                )
                export_which = gr.Number(
                    value=0, precision=0, label="Reply number (0 = last)", elem_id="export-which"
                )
                export_btn = gr.Button("Export", elem_id="export", size="sm")
                export_file = gr.File(label="Download", elem_id="export-file", interactive=False)
            with gr.Accordion("Import", open=False):
                import_file_c = gr.File(
                    label="Trace (.jsonl) or transcript (.txt, .md)",
                    file_types=[".jsonl", ".txt", ".md"],
                    type="filepath",
                    elem_id="import-file",
                )
        with gr.Tabs():
            with gr.Tab("Workbench", id="workbench-tab"):
                board = gr.HTML(
                    value="",
                    html_template='<div class="tf-wb" id="tf-wb"></div>',
                    js_on_load="window.thoughtform.mount(element, props, server, watch);",
                    head=head,
                    server_functions=[tf_events, tf_attention, tf_steer, tf_loom],
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
                    send_btn = gr.Button(
                        "Send", variant="primary", elem_id="send", scale=1, min_width=80
                    )
                    stop_btn = gr.Button(
                        "Stop", variant="stop", elem_id="stop", scale=1, min_width=80
                    )
            with gr.Tab("Voices", id="voices-tab"):
                gr.Markdown(
                    "Edits apply to **this session** (its replies are parsed again at once). "
                    "*Use for new sessions* makes this set the one new sessions start with. "
                    "Hiding a voice is done in the legend and only changes this session's view.",
                    elem_id="voices-note",
                )
                voices_table = gr.Dataframe(
                    headers=VOICE_COLUMNS,
                    datatype=["str"] * len(VOICE_COLUMNS),
                    column_count=len(VOICE_COLUMNS),
                    type="array",
                    interactive=True,
                    column_widths=["11%", "9%", "6%", "8%", "10%", "36%", "10%", "10%"],
                    wrap=True,
                    label=(
                        "Voices (color #RRGGBB; syntax bracket = [Name], tag = <name>…</name>;"
                        " temperature, top_p: sampling while the voice speaks, empty = session's)"
                    ),
                    elem_id="voices-table",
                )
                voice_row = gr.State(None)  # the row last clicked, for "Remove voice"
                with gr.Row():
                    add_voice_btn = gr.Button("Add voice", elem_id="add-voice", size="sm")
                    remove_voice_btn = gr.Button(
                        "Remove selected voice", elem_id="remove-voice", size="sm"
                    )
                    default_voices_btn = gr.Button(
                        "Use for new sessions", elem_id="default-voices", size="sm"
                    )
                with gr.Row():
                    apply_table_btn = gr.Button(
                        "Apply table", elem_id="apply-table", variant="primary"
                    )
                    preset_dd = gr.Dropdown(
                        list(PRESETS), value=None, label="Preset", elem_id="preset"
                    )
                    preset_btn = gr.Button("Use preset", elem_id="use-preset")
                voices_yaml = gr.Code(
                    language="yaml", label="Voice set (YAML)", elem_id="voices-yaml"
                )
                with gr.Row():
                    apply_yaml_btn = gr.Button("Apply YAML", elem_id="apply-yaml")
                    save_yaml_btn = gr.Button("Save YAML", elem_id="save-yaml")
                    load_yaml_btn = gr.UploadButton(
                        "Load YAML",
                        file_types=[".yaml", ".yml", ".json"],
                        type="filepath",
                        elem_id="load-yaml",
                    )
                yaml_file = gr.File(label="voices.yaml", interactive=False, elem_id="yaml-file")
            with gr.Tab("Settings", id="settings-tab"):
                with gr.Row():
                    s_backend = gr.Dropdown(list(BACKENDS), label="Backend", elem_id="set-backend")
                    s_model = gr.Textbox(
                        label=(
                            "Model (embedded, embedded-voices, a .gguf path, a model directory,"
                            " or the server's model name; empty = default)"
                        ),
                        elem_id="set-model",
                    )
                    s_base = gr.Textbox(label="Base URL (openai backend)", elem_id="set-base-url")
                s_model_msg = gr.HTML("", elem_id="set-model-msg")
                with gr.Row():
                    s_att = gr.Checkbox(
                        label="Attention (per layer and voice segment; transformers backend)",
                        elem_id="set-attention",
                        interactive=False,
                    )
                    s_lens = gr.Checkbox(
                        label="Logit lens (each layer's top token; transformers backend)",
                        elem_id="set-logit-lens",
                        interactive=False,
                    )
                with gr.Row():
                    s_temp = gr.Slider(
                        0, 2, step=0.05, label="Temperature", elem_id="set-temperature"
                    )
                    s_top_p = gr.Slider(0, 1, step=0.01, label="Top p", elem_id="set-top-p")
                    s_top_k = gr.Number(
                        precision=0, minimum=0, label="Top k (0 = off)", elem_id="set-top-k"
                    )
                with gr.Row():
                    s_max = gr.Number(
                        precision=0, minimum=1, label="Max tokens", elem_id="set-max-tokens"
                    )
                    s_seed = gr.Number(
                        precision=0, label="Seed (empty = random)", elem_id="set-seed"
                    )
                    s_alts = gr.Slider(
                        0, 20, step=1, label="Alternatives per token", elem_id="set-alternatives"
                    )
                with gr.Row():
                    s_vprompt = gr.Checkbox(
                        label="Ask for voices with a system prompt", elem_id="set-voice-prompt"
                    )
                    s_struct = gr.Checkbox(
                        label=(
                            "Structure: every reply is 2 or more voice blocks, each a declared"
                            " marker then text (backends with token control or a grammar)"
                        ),
                        elem_id="set-structure",
                    )
                s_system = gr.Textbox(label="Extra system prompt", lines=3, elem_id="set-system")
                save_settings_btn = gr.Button(
                    "Save settings", variant="primary", elem_id="save-settings"
                )
            with gr.Tab("Dataset", id="dataset-tab"):
                with gr.Row(equal_height=True):
                    ds_path = gr.Textbox(
                        label="Dataset file on the server (.jsonl or transcript)",
                        elem_id="ds-path",
                        max_lines=1,
                        scale=6,
                    )
                    ds_open = gr.Button("Open", variant="primary", elem_id="ds-open", scale=1)
                    ds_sample = gr.Button(
                        "Try a sample dataset", elem_id="ds-sample", scale=1, size="sm"
                    )
                ds_upload = gr.File(
                    label="…or upload one",
                    file_types=[".jsonl", ".txt", ".md"],
                    type="filepath",
                    elem_id="ds-upload",
                )
                ds_state = gr.State(None)
                ds_summary = gr.Markdown(elem_id="ds-summary")
                with gr.Row():
                    with gr.Column():
                        ds_problems = gr.HTML(elem_id="ds-problems", label="Problems")
                    with gr.Column():
                        ds_stats = gr.HTML(elem_id="ds-stats", label="Statistics")
                with gr.Row():
                    ds_shares = gr.BarPlot(
                        x="voice",
                        y="share",
                        color="voice",
                        y_title="share of voiced tokens (%)",
                        y_lim=[0, None],
                        title="Voices",
                        elem_id="ds-shares",
                    )
                    ds_lengths = gr.BarPlot(
                        x="reply tokens",
                        y="replies",
                        title="Reply length (approximate tokens)",
                        elem_id="ds-lengths",
                    )
                ds_voices = gr.Dataframe(
                    label="Per voice", interactive=False, elem_id="ds-voices", wrap=True
                )
                ds_index = gr.Number(
                    value=0,
                    precision=0,
                    minimum=0,
                    label="Example number (from 0)",
                    elem_id="ds-index",
                    interactive=True,
                )
                ds_example = gr.HTML(elem_id="ds-example")
            with gr.Tab("Compare", id="compare-tab"):
                with gr.Row(equal_height=True):
                    cmp_prompt = gr.Textbox(
                        show_label=False,
                        placeholder="One prompt for both models",
                        elem_id="cmp-prompt",
                        lines=1,
                        max_lines=4,
                        scale=8,
                    )
                    cmp_run = gr.Button("Run", variant="primary", elem_id="cmp-run", scale=1)
                with gr.Row():
                    cmp_lanes = gr.ScatterPlot(
                        x="token",
                        y="model",
                        color="voice",
                        title="Voices along the reply (one mark per token, shared axis)",
                        height=200,
                        scale=3,
                        elem_id="cmp-lanes",
                    )
                    cmp_summary = gr.BarPlot(
                        x="model",
                        y="tokens",
                        color="voice",
                        title="Tokens per voice",
                        height=200,
                        scale=1,
                        elem_id="cmp-summary",
                    )
                with gr.Row():
                    with gr.Column():
                        cmp_left = gr.HTML(elem_id="cmp-left")
                    with gr.Column():
                        cmp_right = gr.HTML(elem_id="cmp-right")
            from .council_view import council_tab  # voices taking turns (council_view.py)

            wire_council = council_tab(wb, request_user)
        settings_fields = [
            s_backend,
            s_model,
            s_base,
            s_temp,
            s_top_p,
            s_top_k,
            s_max,
            s_seed,
            s_alts,
            s_vprompt,
            s_system,
            s_att,
            s_lens,
            s_struct,
        ]

        # -- helpers ---------------------------------------------------------------------

        def settings_values(s: dict[str, Any]) -> list[Any]:
            allowed = dict(zip(SWITCHES, telemetry_switches(str(s.get("backend"))), strict=True))
            return [
                gr.update(value=bool(s.get(k)) and allowed[k], interactive=allowed[k])
                if k in allowed
                else s.get(k)
                for k in SETTING_KEYS
            ]

        def model_msg(backend: str | None, model: str | None, base_url: str | None) -> str:
            problem = model_problem(str(backend or ""), model, base_url)
            if not problem:
                return ""
            return f'<p class="tf-model-msg" role="alert">{html.escape(problem)}</p>'

        def session_view(sid: str | None, user: str | None) -> list[Any]:
            """Everything that changes when a tab shows another session (one of the user's)."""
            try:
                pl, tab = wb.reset_payload(sid, user)
            except WorkbenchError as e:
                raise _error(e) from None
            info = wb.session_info(tab.sid, user)
            vs = wb.voices_of(info)
            return [
                pl,
                tab.to_dict(),
                gr.update(choices=wb.session_choices(user), value=tab.sid),
                info.title if info else "",
                _voice_rows(vs),
                vs.to_yaml(),
                *settings_values(wb.settings_of(info)),
                gr.Timer(active=bool(info and info.settings.get("recorded") is True)),
            ]

        view_outputs = [
            board,
            tab_state,
            session_dd,
            title_tb,
            voices_table,
            voices_yaml,
            *settings_fields,
            live_timer,
        ]

        def on_load(request: gr.Request) -> list[Any]:
            sid = None
            try:
                sid = request.query_params.get("session")
            except AttributeError:
                pass
            return session_view(sid if valid_session_id(sid) else None, request_user(request))

        def on_switch(sid: str | None, request: gr.Request) -> list[Any]:
            return session_view(sid, request_user(request))

        def on_new(request: gr.Request) -> list[Any]:
            user = request_user(request)
            try:
                return session_view(wb.new_session(user=user).id, user)
            except WorkbenchError as e:
                raise _error(e) from None

        def on_rename(title: str, tab: dict[str, Any], request: gr.Request) -> Any:
            t = Tab.of(tab)
            user = request_user(request)
            if t.sid:
                try:
                    wb.rename(t.sid, title, user)
                except (WorkbenchError, StoreError) as e:
                    raise _error(e) from None
            return gr.update(choices=wb.session_choices(user), value=t.sid)

        def on_delete(tab: dict[str, Any], request: gr.Request) -> list[Any]:
            t = Tab.of(tab)
            user = request_user(request)
            if t.sid:
                wb.delete(t.sid, user)
            return session_view(None, user)

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

        def refresh_sessions(tab: dict[str, Any], request: gr.Request) -> tuple[Any, Any]:
            user = request_user(request)
            sid = Tab.of(tab).sid
            info = wb.session_info(sid, user)
            # The name follows the first prompt until renamed (Workbench.send).
            title = info.title if info is not None else gr.skip()
            return gr.update(choices=wb.session_choices(user), value=sid), title

        # ``request`` first: Gradio inserts it at its position, and ``*values`` would swallow it.
        def on_save_settings(
            request: gr.Request, tab: dict[str, Any], *values: Any
        ) -> tuple[Any, str]:
            t = Tab.of(tab)
            if not t.sid:
                return gr.skip(), ""
            user = request_user(request)
            # Over the stored settings: the legend's steering state (muted, next voice) is not
            # a field of this form and must survive a save.
            raw = {
                **wb.settings_of(wb.session_info(t.sid, user)),
                **dict(zip(SETTING_KEYS, values, strict=True)),
            }
            msg = model_msg(raw.get("backend"), raw.get("model"), raw.get("base_url"))
            if msg:
                return gr.skip(), msg  # said next to the field; nothing saved
            try:
                s = wb.save_settings(t.sid, raw, user)
            except (WorkbenchError, StoreError) as e:
                raise _error(e) from None
            gr.Info("Settings saved for this session.")
            # The empty chat says which backend and model are active.
            vs = wb.voices_of(wb.session_info(t.sid, user))
            return payload(t.sid, [info_event(s, vs)]), ""

        def on_backend(backend: str | None, model: str | None, base_url: str | None) -> list[Any]:
            """Backend or model changed: check the model against it, allow its switches."""
            allowed = telemetry_switches(str(backend or ""))
            switches = [
                gr.update(interactive=a, value=False) if not a else gr.update(interactive=True)
                for a in allowed
            ]
            return [model_msg(backend, model, base_url), *switches]

        def on_model(backend: str | None, model: str | None, base_url: str | None) -> str:
            return model_msg(backend, model, base_url)

        def apply_voices(tab: dict[str, Any], vs: VoiceSet, user: str | None) -> list[Any]:
            t = Tab.of(tab)
            if not t.sid:
                raise _error(WorkbenchError("no session open"))
            try:
                wb.set_voices(t.sid, vs, user)
            except (WorkbenchError, StoreError) as e:
                raise _error(e) from None
            pl, new_tab = wb.reset_payload(t.sid, user)
            return [pl, new_tab.to_dict(), _voice_rows(vs), vs.to_yaml()]

        voice_outputs = [board, tab_state, voices_table, voices_yaml]

        def current_voices(tab: dict[str, Any], user: str | None) -> VoiceSet:
            return wb.voices_of(wb.session_info(Tab.of(tab).sid, user))

        def shown_colors(tab: dict[str, Any], user: str | None) -> dict[str, str]:
            """The colours the session shows now (declared and undeclared voices): kept."""
            info = wb.session_info(Tab.of(tab).sid, user)
            if info is None:
                return {}
            return wb.encoder_for(info)[0].colors.shown()

        def on_apply_table(tab: dict[str, Any], rows: Any, request: gr.Request) -> list[Any]:
            user = request_user(request)
            try:
                vs = voices_from_rows(rows, current_voices(tab, user), shown_colors(tab, user))
                return apply_voices(tab, vs, user)
            except VoiceSetError as e:
                raise _error(e) from None

        def on_apply_yaml(tab: dict[str, Any], text: str, request: gr.Request) -> list[Any]:
            user = request_user(request)
            try:
                return apply_voices(tab, voices_from_yaml(text, shown_colors(tab, user)), user)
            except VoiceSetError as e:
                raise _error(e) from None

        def on_add_voice(rows: Any) -> Any:
            return add_row(rows)

        def on_pick_row(evt: gr.SelectData) -> int | None:
            idx = evt.index
            row = idx[0] if isinstance(idx, (list, tuple)) else idx
            return int(row) if isinstance(row, int) else None

        def on_remove_voice(rows: Any, row: int | None) -> tuple[Any, None]:
            if row is None:
                raise _error(WorkbenchError("click a cell of the voice to remove first"))
            return remove_row(rows, row), None

        def on_default_voices(tab: dict[str, Any], request: gr.Request) -> None:
            user = request_user(request)
            vs = current_voices(tab, user)
            try:
                wb.set_default_voices(vs, user)
            except WorkbenchError as e:
                raise _error(e) from None
            gr.Info(f"New sessions start with the voices {vs.name or 'of this session'}.")

        def on_preset(tab: dict[str, Any], name: str | None, request: gr.Request) -> list[Any]:
            if name is None or name not in PRESETS:
                raise _error(WorkbenchError("pick a preset first"))
            return apply_voices(tab, PRESETS[name], request_user(request))

        def on_load_yaml(tab: dict[str, Any], path: str | None, request: gr.Request) -> list[Any]:
            if not path:
                return [gr.skip()] * 4
            try:
                text = Path(path).read_bytes()[:1_000_000].decode("utf-8-sig", errors="replace")
                return apply_voices(tab, voices_from_yaml(text), request_user(request))
            except VoiceSetError as e:
                raise _error(e) from None

        def on_save_yaml(tab: dict[str, Any], request: gr.Request) -> str:
            vs = current_voices(tab, request_user(request))
            out = wb.new_export_dir() / safe_filename(vs.name or "voices", ".yaml")
            out.write_text(vs.to_yaml(), encoding="utf-8")
            return str(out)

        def on_export(
            tab: dict[str, Any], kind: str, which: float | None, request: gr.Request
        ) -> str | None:
            t = Tab.of(tab)
            info = wb.session_info(t.sid, request_user(request))
            if info is None:
                raise _error(WorkbenchError("no session open"))
            vs = wb.voices_of(info)
            msgs = wb.store.messages(info.id)
            d = wb.new_export_dir()
            if kind == "Markdown":
                out = d / safe_filename(info.title, ".md")
                out.write_text(session_markdown(info, msgs, vs, store=wb.store), encoding="utf-8")
                return str(out)
            trace = reply_trace(info, msgs, int(which or 0), vs, store=wb.store)
            if trace is None:
                raise _error(WorkbenchError("this session has no reply to export yet"))
            if kind == "HTML report":
                try:
                    from ..render.html import render_report
                except ImportError as e:
                    raise _error(WorkbenchError(f"HTML reports are not available: {e}")) from None
                out = d / safe_filename(info.title, ".html")
                out.write_text(
                    render_report(trace, vs, tokens=bool(trace.tokens), title=info.title),
                    encoding="utf-8",
                )
                return str(out)
            out = d / safe_filename(info.title, ".jsonl")
            trace.save(out)
            return str(out)

        def on_import(path: str | None, request: gr.Request) -> list[Any]:
            if not path:
                return [gr.skip()] * len(view_outputs)
            user = request_user(request)
            try:
                wb.owner(user)  # a login is checked before anything is stored
                sid, warnings = import_file(wb.store, path, wb.default_settings())
                wb.adopt(sid, user)
            except (ImportError_, StoreError, OSError, WorkbenchError) as e:
                raise _error(e) from None
            if warnings:
                gr.Warning(plain(f"{len(warnings)} lines skipped; first: {warnings[0]}"))
            return session_view(sid, user)

        # -- dataset and compare tabs (logic in dataset_view / compare_view) -------------

        from ..data.lines import DatasetError
        from .compare_view import (
            BackendPair,
            compare_html,
            lanes_frame,
            run_pair,
            summary_frame,
        )
        from .compare_view import voice_colors as compare_colors
        from .dataset_view import (
            example_html,
            lengths_frame,
            lengths_text,
            open_dataset,
            problems_html,
            sample_dataset,
            stats_html,
            summary_text,
            voice_colors,
            voices_frame,
        )

        def on_ds_path(path: str | None) -> list[Any]:
            # A typed path reads any file the server can (the sessions database of every user
            # included): only for one person's workbench, on loopback without a login.
            if not is_loopback(config.host) or wb.scoped:
                raise _error(
                    WorkbenchError("server paths only on loopback without a login; upload the file")
                )
            return on_ds_open(path)

        def on_ds_open(path: str | None) -> list[Any]:
            try:
                view = open_dataset(path or "", config.voices)
            except (DatasetError, OSError, ValueError) as e:
                raise _error(e) from None
            top = max(0, len(view.examples) - 1)
            frame = voices_frame(view.stats)
            order = list(frame["voice"])
            return [
                view,
                plain(summary_text(view)),
                problems_html(view),
                stats_html(view),
                gr.BarPlot(frame, color_map=voice_colors(view.stats), sort=order),
                frame,
                gr.BarPlot(
                    lengths_frame(view.stats),
                    sort=list(lengths_frame(view.stats)["reply tokens"]),
                    caption=lengths_text(view.stats),
                ),
                gr.update(maximum=top, value=0),
                example_html(view, 0, config.voices),
            ]

        def on_ds_sample() -> list[Any]:
            # Made now by ``dataset synth`` (40 examples) in this server's private directory.
            try:
                path = sample_dataset(wb.new_export_dir(), config.voices)
            except (OSError, ValueError) as e:
                raise _error(e) from None
            return [str(path), *on_ds_open(str(path))]

        def on_ds_index(view: Any, index: float | None) -> str:
            if view is None:
                return ""
            return example_html(view, int(index or 0), config.voices)

        pair = BackendPair()

        def on_compare(text: str) -> tuple[Any, ...]:
            try:
                traces = run_pair(pair.get(), text, config.voices, seed=0, max_tokens=120)
            except Exception as e:  # a missing model or adapter is shown, not a crash
                raise _error(e) from None
            left, right = compare_html(traces, config.voices)
            colors = compare_colors(traces, config.voices)
            longest = max(len(t.tokens) for t in traces)
            return (
                left,
                right,
                gr.ScatterPlot(lanes_frame(traces), color_map=colors, x_lim=[0, max(1, longest)]),
                gr.BarPlot(summary_frame(traces), color_map=colors),
            )

        # -- wiring ----------------------------------------------------------------------

        def on_recorded(only: bool, tab: dict[str, Any], request: gr.Request) -> Any:
            user = request_user(request)
            return gr.update(choices=wb.session_choices(user, recorded_only=bool(only)))

        def on_tick(tab: dict[str, Any], request: gr.Request) -> tuple[Any, Any]:
            # A session the proxy is recording (same database, another process) redraws as
            # it changes; nothing is sent while this server streams into it itself.
            got = wb.live_update(Tab.of(tab), request_user(request))
            if got is None:
                return gr.skip(), gr.skip()
            return got[0], got[1].to_dict()

        demo.load(on_load, None, view_outputs, show_progress="hidden")
        recorded_cb.change(
            on_recorded, [recorded_cb, tab_state], session_dd, show_progress="hidden"
        )
        live_timer.tick(on_tick, tab_state, [board, tab_state], show_progress="hidden")
        session_dd.input(on_switch, session_dd, view_outputs, show_progress="hidden")
        new_btn.click(on_new, None, view_outputs, show_progress="hidden")
        rename_btn.click(on_rename, [title_tb, tab_state], session_dd, show_progress="hidden")
        delete_btn.click(on_delete, tab_state, view_outputs, show_progress="hidden")
        send_args: dict[str, Any] = {
            "fn": on_send,
            "inputs": [prompt, tab_state],
            "outputs": [board, tab_state, prompt],
            "show_progress": "hidden",
            "concurrency_id": "generate",
            # Replies wait their turn in the workbench's fair queue (one model at a time,
            # round-robin between users, each shown their place), not in Gradio's FIFO.
            "concurrency_limit": MAX_WAITING_SENDS,
        }
        sent = prompt.submit(**send_args)
        sent.then(refresh_sessions, tab_state, [session_dd, title_tb], show_progress="hidden")
        clicked = send_btn.click(**send_args)
        clicked.then(refresh_sessions, tab_state, [session_dd, title_tb], show_progress="hidden")
        stop_btn.click(on_stop, tab_state, None, show_progress="hidden", concurrency_limit=None)
        save_settings_btn.click(
            on_save_settings, [tab_state, *settings_fields], [board, s_model_msg]
        )
        check_args = [s_backend, s_model, s_base]
        s_backend.input(
            on_backend, check_args, [s_model_msg, s_att, s_lens], show_progress="hidden"
        )
        s_model.blur(on_model, check_args, s_model_msg, show_progress="hidden")
        s_base.blur(on_model, check_args, s_model_msg, show_progress="hidden")
        voices_table.select(on_pick_row, None, voice_row, show_progress="hidden")
        add_voice_btn.click(on_add_voice, voices_table, voices_table)
        remove_voice_btn.click(
            on_remove_voice, [voices_table, voice_row], [voices_table, voice_row]
        )
        default_voices_btn.click(on_default_voices, tab_state, None)
        apply_table_btn.click(
            on_apply_table, [tab_state, voices_table], voice_outputs, show_progress="hidden"
        )
        apply_yaml_btn.click(
            on_apply_yaml, [tab_state, voices_yaml], voice_outputs, show_progress="hidden"
        )
        preset_btn.click(on_preset, [tab_state, preset_dd], voice_outputs, show_progress="hidden")
        load_yaml_btn.upload(
            on_load_yaml, [tab_state, load_yaml_btn], voice_outputs, show_progress="hidden"
        )
        save_yaml_btn.click(on_save_yaml, tab_state, yaml_file)
        export_btn.click(on_export, [tab_state, export_kind, export_which], export_file)
        import_file_c.upload(on_import, import_file_c, view_outputs, show_progress="hidden")
        ds_outputs = [
            ds_state,
            ds_summary,
            ds_problems,
            ds_stats,
            ds_shares,
            ds_voices,
            ds_lengths,
            ds_index,
            ds_example,
        ]
        ds_sample.click(on_ds_sample, None, [ds_path, *ds_outputs])
        ds_open.click(on_ds_path, ds_path, ds_outputs)
        ds_path.submit(on_ds_path, ds_path, ds_outputs)
        ds_upload.upload(on_ds_open, ds_upload, ds_outputs)
        ds_index.change(on_ds_index, [ds_state, ds_index], ds_example, show_progress="hidden")
        cmp_args: dict[str, Any] = {
            "fn": on_compare,
            "inputs": cmp_prompt,
            "outputs": [cmp_left, cmp_right, cmp_lanes, cmp_summary],
            "concurrency_id": "compare",
            "concurrency_limit": 1,
        }
        cmp_run.click(**cmp_args)
        cmp_prompt.submit(**cmp_args)
        wire_council()  # after the page's own events: the load event stays fn_index 0
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
