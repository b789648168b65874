"""The workbench's Settings tab: which telemetry switches a backend allows, what is wrong with a
model name for a backend (one line, shown next to the field), and the tab itself
(:func:`settings_tab`: the session's backend, model, sampling and switches)."""

from __future__ import annotations

import html
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ..backends import BUILTIN, BackendError, Capabilities
from ..conversation import check_model
from ..models import MODEL_CHOICES
from .common import fail, request_user
from .service import BACKENDS, Tab, Workbench, WorkbenchError
from .store import StoreError
from .stream import info_event, payload

# The session settings the form edits, in the order of ``SettingsTab.fields``.
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


def model_msg(backend: str | None, model: str | None, base_url: str | None) -> str:
    """:func:`model_problem` as the HTML shown next to the field (escaped; ``""`` when fine)."""
    problem = model_problem(str(backend or ""), model, base_url)
    if not problem:
        return ""
    return f'<p class="tf-model-msg" role="alert">{html.escape(problem)}</p>'


def settings_values(s: dict[str, Any]) -> list[Any]:
    """The form's values for stored settings ``s`` (a switch the backend lacks is off and
    locked), in the order of ``SETTING_KEYS``."""
    allowed = dict(zip(SWITCHES, telemetry_switches(str(s.get("backend"))), strict=True))
    return [
        gr.update(value=bool(s.get(k)) and allowed[k], interactive=allowed[k])
        if k in allowed
        else s.get(k)
        for k in SETTING_KEYS
    ]


@dataclass
class SettingsTab:
    """The Settings tab's components."""

    wb: Workbench
    fields: list[Any]  # one per SETTING_KEYS entry, in that order
    model_msg: gr.HTML
    save_btn: gr.Button

    def field(self, key: str) -> Any:
        """The component of setting ``key``."""
        return self.fields[SETTING_KEYS.index(key)]

    def wire(self, tab_state: gr.State, board: gr.HTML) -> None:
        """Register Save (the board says which backend and model are active) and the checks
        that run as the backend or the model changes."""
        wb = self.wb

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
                raise fail(e) from None
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

        self.save_btn.click(on_save_settings, [tab_state, *self.fields], [board, self.model_msg])
        backend, model, base = self.field("backend"), self.field("model"), self.field("base_url")
        check_args = [backend, model, base]
        switches = [self.field(k) for k in SWITCHES]
        backend.input(on_backend, check_args, [self.model_msg, *switches], show_progress="hidden")
        model.blur(on_model, check_args, self.model_msg, show_progress="hidden")
        base.blur(on_model, check_args, self.model_msg, show_progress="hidden")


def settings_tab(wb: Workbench) -> SettingsTab:
    """Lay out the Settings tab (call inside the page's ``gr.Tabs``)."""
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
            s_temp = gr.Slider(0, 2, step=0.05, label="Temperature", elem_id="set-temperature")
            s_top_p = gr.Slider(0, 1, step=0.01, label="Top p", elem_id="set-top-p")
            s_top_k = gr.Number(
                precision=0, minimum=0, label="Top k (0 = off)", elem_id="set-top-k"
            )
        with gr.Row():
            s_max = gr.Number(precision=0, minimum=1, label="Max tokens", elem_id="set-max-tokens")
            s_seed = gr.Number(precision=0, label="Seed (empty = random)", elem_id="set-seed")
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
        save_btn = gr.Button("Save settings", variant="primary", elem_id="save-settings")
    fields = [
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
    return SettingsTab(wb, fields, s_model_msg, save_btn)


__all__ = [
    "SETTING_KEYS",
    "SWITCHES",
    "SettingsTab",
    "declared_capabilities",
    "model_msg",
    "model_problem",
    "settings_tab",
    "settings_values",
    "telemetry_switches",
]
