"""The sidebar: which session this browser tab shows (its ``gr.State``), the session list (all,
or only those ``thoughtform proxy`` recorded, redrawn live while one is open), new, rename,
delete, export and import; and :meth:`SessionsPanel.session_view`, the reset that fills every
other tab when the tab shows another session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from .chat_view import ChatTab
from .common import fail, plain, request_user
from .export import ImportError_, import_file, reply_trace, safe_filename, session_markdown
from .service import Tab, Workbench, WorkbenchError
from .settings_view import SettingsTab, settings_values
from .store import StoreError, valid_session_id
from .voices_view import VoicesTab

EXPORTS = ["Trace (JSONL)", "HTML report", "Markdown"]
LIVE_POLL_S = 2.0  # how often an open recorded session is looked at again


@dataclass
class SessionsPanel:
    """The sidebar's components and the browser tab's state."""

    wb: Workbench
    tab_state: gr.State  # the Tab (session, reply counters) as a dict
    session_dd: gr.Dropdown
    recorded_cb: gr.Checkbox
    live_timer: gr.Timer
    new_btn: gr.Button
    title_tb: gr.Textbox
    rename_btn: gr.Button
    delete_btn: gr.Button
    export_kind: gr.Radio
    export_which: gr.Number
    export_btn: gr.Button
    export_file: gr.File
    import_file: gr.File

    def refresh_sessions(self, tab: dict[str, Any], request: gr.Request) -> tuple[Any, Any]:
        """The session list and the name of the tab's session (after a reply named it)."""
        user = request_user(request)
        sid = Tab.of(tab).sid
        info = self.wb.session_info(sid, user)
        # The name follows the first prompt until renamed (Workbench.send).
        title = info.title if info is not None else gr.skip()
        return gr.update(choices=self.wb.session_choices(user), value=sid), title

    def after_send(self, dep: Any) -> None:
        """Chain the list's refresh onto a send event ``dep``."""
        dep.then(
            self.refresh_sessions,
            self.tab_state,
            [self.session_dd, self.title_tb],
            show_progress="hidden",
        )

    def wire(
        self, demo: gr.Blocks, chat: ChatTab, voices: VoicesTab, settings: SettingsTab
    ) -> None:
        """Register the page's load (call first: its HTTP test addresses it as fn_index 0) and
        the sidebar's events; a session shown fills ``chat``, ``voices`` and ``settings``."""
        wb = self.wb
        view_outputs = [
            chat.board,
            self.tab_state,
            self.session_dd,
            self.title_tb,
            *voices.outputs,
            *settings.fields,
            self.live_timer,
        ]

        def session_view(sid: str | None, user: str | None) -> list[Any]:
            """Everything that changes when a tab shows another session (one of the user's)."""
            try:
                pl, tab = wb.reset_payload(sid, user)
            except WorkbenchError as e:
                raise fail(e) from None
            info = wb.session_info(tab.sid, user)
            vs = wb.voices_of(info)
            return [
                pl,
                tab.to_dict(),
                gr.update(choices=wb.session_choices(user), value=tab.sid),
                info.title if info else "",
                *voices.values(vs, wb.settings_of(info)),
                *settings_values(wb.settings_of(info)),
                gr.Timer(active=bool(info and info.settings.get("recorded") is True)),
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
                raise fail(e) from None

        def on_rename(title: str, tab: dict[str, Any], request: gr.Request) -> Any:
            t = Tab.of(tab)
            user = request_user(request)
            if t.sid:
                try:
                    wb.rename(t.sid, title, user)
                except (WorkbenchError, StoreError) as e:
                    raise fail(e) from None
            return gr.update(choices=wb.session_choices(user), value=t.sid)

        def on_delete(tab: dict[str, Any], request: gr.Request) -> list[Any]:
            t = Tab.of(tab)
            user = request_user(request)
            if t.sid:
                wb.delete(t.sid, user)
            return session_view(None, user)

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

        def on_export(
            tab: dict[str, Any], kind: str, which: float | None, request: gr.Request
        ) -> str | None:
            t = Tab.of(tab)
            info = wb.session_info(t.sid, request_user(request))
            if info is None:
                raise fail(WorkbenchError("no session open"))
            vs = wb.voices_of(info)
            msgs = wb.store.messages(info.id)
            d = wb.new_export_dir()
            if kind == "Markdown":
                out = d / safe_filename(info.title, ".md")
                out.write_text(session_markdown(info, msgs, vs, store=wb.store), encoding="utf-8")
                return str(out)
            trace = reply_trace(info, msgs, int(which or 0), vs, store=wb.store)
            if trace is None:
                raise fail(WorkbenchError("this session has no reply to export yet"))
            if kind == "HTML report":
                try:
                    from ..render.html import render_report
                except ImportError as e:
                    raise fail(WorkbenchError(f"HTML reports are not available: {e}")) from None
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
                raise fail(e) from None
            if warnings:
                gr.Warning(plain(f"{len(warnings)} lines skipped; first: {warnings[0]}"))
            return session_view(sid, user)

        quiet: dict[str, Any] = {"show_progress": "hidden"}
        demo.load(on_load, None, view_outputs, **quiet)
        st = self.tab_state
        self.recorded_cb.change(on_recorded, [self.recorded_cb, st], self.session_dd, **quiet)
        self.live_timer.tick(on_tick, st, [chat.board, st], **quiet)
        self.session_dd.input(on_switch, self.session_dd, view_outputs, **quiet)
        self.new_btn.click(on_new, None, view_outputs, **quiet)
        self.rename_btn.click(on_rename, [self.title_tb, st], self.session_dd, **quiet)
        self.delete_btn.click(on_delete, st, view_outputs, **quiet)
        self.export_btn.click(
            on_export, [st, self.export_kind, self.export_which], self.export_file
        )
        self.import_file.upload(on_import, self.import_file, view_outputs, **quiet)


def sessions_sidebar(wb: Workbench) -> SessionsPanel:
    """Lay out the sidebar and the tab's state (call first inside the page's ``gr.Blocks``)."""
    tab_state = gr.State(Tab().to_dict())
    with gr.Sidebar(label="Sessions", open=True, width=300):
        session_dd = gr.Dropdown(label="Session", choices=[], elem_id="session", interactive=True)
        recorded_cb = gr.Checkbox(
            False,
            label="Recorded only (sessions thoughtform proxy wrote)",
            elem_id="recorded-only",
        )
        # Polls only while a recorded session is open (thoughtform proxy writes it).
        live_timer = gr.Timer(LIVE_POLL_S, active=False)
        new_btn = gr.Button("New session", elem_id="new-session", size="sm")
        title_tb = gr.Textbox(label="Name", elem_id="session-title", max_lines=1)
        with gr.Row():
            rename_btn = gr.Button("Rename", elem_id="rename", size="sm")
            delete_btn = gr.Button("Delete", elem_id="delete", size="sm", variant="stop")
        with gr.Accordion("Export", open=False):
            export_kind = gr.Radio(EXPORTS, value=EXPORTS[0], label="Format", elem_id="export-kind")
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
    return SessionsPanel(
        wb,
        tab_state,
        session_dd,
        recorded_cb,
        live_timer,
        new_btn,
        title_tb,
        rename_btn,
        delete_btn,
        export_kind,
        export_which,
        export_btn,
        export_file,
        import_file_c,
    )


__all__ = ["EXPORTS", "SessionsPanel", "sessions_sidebar"]
