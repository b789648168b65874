"""The workbench's Voices tab: the editor table (add and remove rows, per-voice sampling), YAML,
and colours that stay put when the set changes (see ``colors.fill_colors``), as pure functions;
and the tab itself (:func:`voices_tab`), which edits the open session's voice set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..voices import PRESETS, VoiceSet, VoiceSetError, voice_set_from_dict
from .colors import fill_colors, safe_hex
from .common import fail, request_user
from .export import safe_filename
from .service import VOICE_VECTORS, Tab, Workbench, WorkbenchError
from .store import StoreError

if TYPE_CHECKING:
    from ..vectors.sets import VectorSet

VOICE_COLUMNS = [
    "name",
    "color",
    "glyph",
    "syntax",
    "aliases",
    "description",
    "temperature",
    "top_p",
]
_SAMPLING = {"temperature": 6, "top_p": 7}  # column of each per-voice sampling override


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def voice_rows(vs: VoiceSet) -> list[list[str]]:
    """The table rows of a voice set, in lane order."""
    return [
        [
            v.name,
            v.color,
            v.glyph,
            v.syntax,
            ", ".join(v.aliases),
            v.description,
            _num(v.temperature),
            _num(v.top_p),
        ]
        for v in sorted(vs.voices, key=lambda v: v.lane)
    ]


def table_rows(rows: Any) -> list[list[str]]:
    """The table's value as rows of stripped strings, each as wide as VOICE_COLUMNS."""
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    if isinstance(rows, dict) and "data" in rows:
        rows = rows["data"]
    out = []
    for r in rows or []:
        cells = [("" if c is None else str(c)).strip() for c in list(r)[: len(VOICE_COLUMNS)]]
        out.append(cells + [""] * (len(VOICE_COLUMNS) - len(cells)))
    return out


def add_row(rows: Any) -> list[list[str]]:
    """The table with one more, empty voice row. Its colour stays empty until the table is
    applied: a voice the session already shows then keeps its colour, a new one gets a colour
    that nothing shows (``colors.fill_colors``)."""
    return [*table_rows(rows), ["", "", "", "bracket", "", "", "", ""]]


def remove_row(rows: Any, index: int | None) -> list[list[str]]:
    """The table without row ``index`` (unchanged when there is no such row)."""
    out = table_rows(rows)
    if index is None or not 0 <= index < len(out):
        return out
    return out[:index] + out[index + 1 :]


def voices_from_rows(
    rows: Any, current: VoiceSet, shown: Mapping[str, str] | None = None
) -> VoiceSet:
    """A voice set from the editor table (validated). ``shown``: the colours the session shows
    now, which voices keep (a new voice gets a colour nothing shows); a voice of ``current``
    keeps its vector strength (set by the sliders) and its backend binding (not columns)."""
    voices: list[dict[str, Any]] = []
    for i, cells in enumerate(table_rows(rows)):
        name, color, glyph, syntax, aliases, desc = cells[:6]
        if not name:
            continue
        d: dict[str, Any] = {"name": name, "lane": i + 1, "description": desc}
        if color:
            d["color"] = color
        if glyph:
            d["glyph"] = glyph
        if syntax:
            d["syntax"] = syntax
        al = [a.strip() for a in aliases.split(",") if a.strip()]
        if al:
            d["aliases"] = al
        kept = current.get(name)
        if kept is not None:
            # Fields the table has no column for: the vector sliders' strength and the voice's
            # own backend binding (set in YAML) stay as they were.
            if kept.vector is not None:
                d["vector"] = kept.vector
            d.update(kept.binding)
        for key, col in _SAMPLING.items():
            if cells[col]:
                try:
                    d[key] = float(cells[col])
                except ValueError:
                    raise VoiceSetError(
                        f"voices table: voices[{len(voices)}].{key}: must be a number, got"
                        f" {cells[col][:40]!r}"
                    ) from None
        voices.append(d)
    data = {
        "name": current.name,
        "description": current.description,
        "unknown": current.unknown,
        "default_voice": current.default_voice,
        "voices": voices,
    }
    return voice_set_from_dict(_with_colors(data, shown), source="voices table")


def voices_from_yaml(text: str, shown: Mapping[str, str] | None = None) -> VoiceSet:
    """A voice set from YAML typed or loaded into the editor (colours kept as in the table)."""
    import yaml

    try:
        data = yaml.safe_load(text or "")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise VoiceSetError(
            f"voices YAML: {where}{getattr(e, 'problem', None) or 'invalid YAML'}"
        ) from None
    if isinstance(data, dict):
        data = _with_colors(data, shown)
    return voice_set_from_dict(data, source="voices YAML")


def _with_colors(data: dict[str, Any], shown: Mapping[str, str] | None) -> dict[str, Any]:
    # Invalid colours are left for voice_set_from_dict to report (with the field's name).
    for v in data.get("voices") or []:
        c = v.get("color") if isinstance(v, dict) else None
        if c and safe_hex(c, "") == "":
            return data
    return fill_colors(data, shown or {})


# Voice-vector sliders: a fixed pool (Gradio outputs are fixed), one per declared voice in lane
# order; a set with more voices sets the rest in YAML (``vector:``).
MAX_VECTOR_SLIDERS = 16
SLIDER_MIN, SLIDER_MAX, SLIDER_STEP = -2.0, 2.0, 0.1


@dataclass(frozen=True)
class VectorSlider:
    """One voice's slider: its name, the strength it shows, and whether the vector set has a
    direction for it (a voice without one cannot be steered by a vector)."""

    voice: str
    strength: float
    steerable: bool


def _clamp(x: float) -> float:
    return round(min(SLIDER_MAX, max(SLIDER_MIN, x)), 2)


def vector_sliders(vs: VoiceSet, vectors: VectorSet | None) -> list[VectorSlider]:
    """The sliders of voice set ``vs`` (lane order, at most MAX_VECTOR_SLIDERS): each shows
    the strength a reply uses (``vectors.strength``: the voice's ``vector`` or the set's
    default), clamped to the slider's range; ``vectors`` is a ``VectorSet`` (None: none
    loaded, nothing steerable)."""
    out = []
    for v in sorted(vs.voices, key=lambda v: v.lane)[:MAX_VECTOR_SLIDERS]:
        if vectors is not None and vectors.get(v.name) is not None:
            steerable, strength = True, vectors.strength(v.name, vs)
        else:
            steerable, strength = False, v.vector or 0.0
        out.append(VectorSlider(v.name, _clamp(strength), steerable))
    return out


def with_vector_strengths(
    vs: VoiceSet, values: Sequence[float | None], vectors: VectorSet | None
) -> VoiceSet:
    """``vs`` with each steerable voice's ``vector`` set from its slider's value, in the order
    of :func:`vector_sliders`; a slider left where it was changes nothing (so a strength
    outside the sliders' range, set in YAML, survives)."""
    moved: dict[str, float] = {}
    for sl, val in zip(vector_sliders(vs, vectors), values, strict=False):
        if not sl.steerable or not isinstance(val, (int, float)):
            continue
        if abs(float(val) - sl.strength) > 1e-9:
            moved[sl.voice] = _clamp(float(val))
    if not moved:
        return vs
    data = vs.to_dict()
    for d in data.get("voices") or []:
        if d.get("name") in moved:
            d["vector"] = moved[d["name"]]
    return voice_set_from_dict(data, source="voice vector sliders")


@dataclass
class VoicesTab:
    """The Voices tab's components."""

    wb: Workbench
    table: gr.Dataframe
    yaml: gr.Code
    row: gr.State  # the row last clicked, for "Remove voice"
    add_btn: gr.Button
    remove_btn: gr.Button
    default_btn: gr.Button
    apply_table_btn: gr.Button
    preset: gr.Dropdown
    preset_btn: gr.Button
    apply_yaml_btn: gr.Button
    save_yaml_btn: gr.Button
    load_yaml_btn: gr.UploadButton
    yaml_file: gr.File
    vectors_on: gr.Checkbox
    sliders: list[gr.Slider]
    apply_vectors_btn: gr.Button
    _vectors: list[VectorSet | None] = field(default_factory=list)  # loaded once

    def vectors(self) -> VectorSet | None:
        """The vector set sessions steer with (``service.VOICE_VECTORS``), loaded on first use;
        None where it cannot be read (every slider is then locked)."""
        if not self._vectors:
            from ..vectors.cvec import VectorFileError
            from ..vectors.sets import load_vector_set

            try:
                self._vectors.append(load_vector_set(VOICE_VECTORS))
            except (VectorFileError, OSError):
                self._vectors.append(None)
        return self._vectors[0]

    @property
    def outputs(self) -> list[Any]:
        """What shows a session's voice set and vector switch (filled by :meth:`values`)."""
        return [self.table, self.yaml, self.vectors_on, *self.sliders]

    def values(self, vs: VoiceSet, settings: Mapping[str, Any]) -> list[Any]:
        """The values of :attr:`outputs` for voice set ``vs`` and session settings."""
        shown = vector_sliders(vs, self.vectors())
        sliders = []
        for i in range(len(self.sliders)):
            if i >= len(shown):
                sliders.append(gr.update(visible=False, value=0))
                continue
            sl = shown[i]
            label = sl.voice if sl.steerable else f"{sl.voice} (no vector in the set)"
            sliders.append(
                gr.update(visible=True, value=sl.strength, label=label, interactive=sl.steerable)
            )
        return [voice_rows(vs), vs.to_yaml(), bool(settings.get("voice_vectors")), *sliders]

    def wire(self, tab_state: gr.State, board: gr.HTML) -> None:
        """Register the editor's events: each applied set is the open session's at once (its
        replies are parsed again and the board redrawn)."""
        wb = self.wb

        def current_voices(tab: dict[str, Any], user: str | None) -> VoiceSet:
            return wb.voices_of(wb.session_info(Tab.of(tab).sid, user))

        def shown_colors(tab: dict[str, Any], user: str | None) -> dict[str, str]:
            """The colours the session shows now (declared and undeclared voices): kept."""
            info = wb.session_info(Tab.of(tab).sid, user)
            if info is None:
                return {}
            return wb.encoder_for(info)[0].colors.shown()

        def apply_voices(tab: dict[str, Any], vs: VoiceSet, user: str | None) -> list[Any]:
            t = Tab.of(tab)
            if not t.sid:
                raise fail(WorkbenchError("no session open"))
            try:
                wb.set_voices(t.sid, vs, user)
            except (WorkbenchError, StoreError) as e:
                raise fail(e) from None
            pl, new_tab = wb.reset_payload(t.sid, user)
            return [pl, new_tab.to_dict(), *self.values(vs, session_settings(tab, user))]

        def session_settings(tab: dict[str, Any], user: str | None) -> dict[str, Any]:
            return wb.settings_of(wb.session_info(Tab.of(tab).sid, user))

        # ``request`` first: Gradio inserts it at its position, and ``*values`` would swallow it.
        def on_apply_vectors(
            request: gr.Request, tab: dict[str, Any], on: bool, *values: float | None
        ) -> list[Any]:
            user = request_user(request)
            t = Tab.of(tab)
            info = wb.session_info(t.sid, user)
            if info is None or not t.sid:
                raise fail(WorkbenchError("no session open"))
            vs = current_voices(tab, user)
            try:
                new_vs = with_vector_strengths(vs, values, self.vectors())
                s = wb.settings_of(info)
                if bool(on) != bool(s.get("voice_vectors")):
                    wb.save_settings(t.sid, {**s, "voice_vectors": bool(on)}, user)
            except (VoiceSetError, WorkbenchError, StoreError) as e:
                raise fail(e) from None
            if new_vs is vs:
                pl, new_tab = wb.reset_payload(t.sid, user)
                out = [pl, new_tab.to_dict(), *self.values(vs, session_settings(tab, user))]
            else:
                out = apply_voices(tab, new_vs, user)
            gr.Info(
                "Voice vectors on for this session's next replies."
                if on
                else "Voice vectors off for this session (strengths kept)."
            )
            return out

        def on_apply_table(tab: dict[str, Any], rows: Any, request: gr.Request) -> list[Any]:
            user = request_user(request)
            try:
                vs = voices_from_rows(rows, current_voices(tab, user), shown_colors(tab, user))
                return apply_voices(tab, vs, user)
            except VoiceSetError as e:
                raise fail(e) from None

        def on_apply_yaml(tab: dict[str, Any], text: str, request: gr.Request) -> list[Any]:
            user = request_user(request)
            try:
                return apply_voices(tab, voices_from_yaml(text, shown_colors(tab, user)), user)
            except VoiceSetError as e:
                raise fail(e) from None

        def on_add_voice(rows: Any) -> Any:
            return add_row(rows)

        def on_pick_row(evt: gr.SelectData) -> int | None:
            idx = evt.index
            row = idx[0] if isinstance(idx, (list, tuple)) else idx
            return int(row) if isinstance(row, int) else None

        def on_remove_voice(rows: Any, row: int | None) -> tuple[Any, None]:
            if row is None:
                raise fail(WorkbenchError("click a cell of the voice to remove first"))
            return remove_row(rows, row), None

        def on_default_voices(tab: dict[str, Any], request: gr.Request) -> None:
            user = request_user(request)
            vs = current_voices(tab, user)
            try:
                wb.set_default_voices(vs, user)
            except WorkbenchError as e:
                raise fail(e) from None
            gr.Info(f"New sessions start with the voices {vs.name or 'of this session'}.")

        def on_preset(tab: dict[str, Any], name: str | None, request: gr.Request) -> list[Any]:
            if name is None or name not in PRESETS:
                raise fail(WorkbenchError("pick a preset first"))
            return apply_voices(tab, PRESETS[name], request_user(request))

        def on_load_yaml(tab: dict[str, Any], path: str | None, request: gr.Request) -> list[Any]:
            if not path:
                return [gr.skip()] * len(voice_outputs)
            try:
                text = Path(path).read_bytes()[:1_000_000].decode("utf-8-sig", errors="replace")
                return apply_voices(tab, voices_from_yaml(text), request_user(request))
            except VoiceSetError as e:
                raise fail(e) from None

        def on_save_yaml(tab: dict[str, Any], request: gr.Request) -> str:
            vs = current_voices(tab, request_user(request))
            out = wb.new_export_dir() / safe_filename(vs.name or "voices", ".yaml")
            out.write_text(vs.to_yaml(), encoding="utf-8")
            return str(out)

        voice_outputs = [board, tab_state, *self.outputs]
        quiet: dict[str, Any] = {"show_progress": "hidden"}
        self.table.select(on_pick_row, None, self.row, **quiet)
        self.add_btn.click(on_add_voice, self.table, self.table)
        self.remove_btn.click(on_remove_voice, [self.table, self.row], [self.table, self.row])
        self.default_btn.click(on_default_voices, tab_state, None)
        self.apply_table_btn.click(on_apply_table, [tab_state, self.table], voice_outputs, **quiet)
        self.apply_yaml_btn.click(on_apply_yaml, [tab_state, self.yaml], voice_outputs, **quiet)
        self.preset_btn.click(on_preset, [tab_state, self.preset], voice_outputs, **quiet)
        self.load_yaml_btn.upload(
            on_load_yaml, [tab_state, self.load_yaml_btn], voice_outputs, **quiet
        )
        self.save_yaml_btn.click(on_save_yaml, tab_state, self.yaml_file)
        self.apply_vectors_btn.click(
            on_apply_vectors, [tab_state, self.vectors_on, *self.sliders], voice_outputs, **quiet
        )


def voices_tab(wb: Workbench) -> VoicesTab:
    """Lay out the Voices tab (call inside the page's ``gr.Tabs``)."""
    with gr.Tab("Voices", id="voices-tab"):
        gr.Markdown(
            "Edits apply to **this session** (its replies are parsed again at once). "
            "*Use for new sessions* makes this set the one new sessions start with. "
            "Hiding a voice is done in the legend and only changes this session's view.",
            elem_id="voices-note",
        )
        table = gr.Dataframe(
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
        row = gr.State(None)
        with gr.Row():
            add_btn = gr.Button("Add voice", elem_id="add-voice", size="sm")
            remove_btn = gr.Button("Remove selected voice", elem_id="remove-voice", size="sm")
            default_btn = gr.Button("Use for new sessions", elem_id="default-voices", size="sm")
        with gr.Row():
            apply_table_btn = gr.Button("Apply table", elem_id="apply-table", variant="primary")
            preset = gr.Dropdown(list(PRESETS), value=None, label="Preset", elem_id="preset")
            preset_btn = gr.Button("Use preset", elem_id="use-preset")
        yaml = gr.Code(language="yaml", label="Voice set (YAML)", elem_id="voices-yaml")
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
        with gr.Accordion("Voice vectors", open=True, elem_id="voice-vectors"):
            gr.Markdown(
                "While a voice speaks, its direction in the model (the shipped set, trained on"
                " the embedded model) is added × its strength; 0 is off. Tokens already written"
                " keep theirs. llamacpp and transformers backends; the lanes mark where a vector"
                " was active.",
                elem_id="vectors-note",
            )
            vectors_on = gr.Checkbox(False, label="Voice vectors on", elem_id="vectors-on")
            with gr.Row(elem_id="vector-sliders"):
                sliders = [
                    gr.Slider(
                        SLIDER_MIN,
                        SLIDER_MAX,
                        value=0,
                        step=SLIDER_STEP,
                        label=f"voice {i + 1}",
                        visible=False,
                        elem_id=f"vector-{i}",
                        elem_classes=["tf-vector-slider"],
                        min_width=160,
                    )
                    for i in range(MAX_VECTOR_SLIDERS)
                ]
            apply_vectors_btn = gr.Button(
                "Apply vectors", elem_id="apply-vectors", variant="primary"
            )
    return VoicesTab(
        wb,
        table,
        yaml,
        row,
        add_btn,
        remove_btn,
        default_btn,
        apply_table_btn,
        preset,
        preset_btn,
        apply_yaml_btn,
        save_yaml_btn,
        load_yaml_btn,
        yaml_file,
        vectors_on,
        sliders,
        apply_vectors_btn,
    )


__all__ = [
    "MAX_VECTOR_SLIDERS",
    "VOICE_COLUMNS",
    "VectorSlider",
    "VoicesTab",
    "add_row",
    "remove_row",
    "table_rows",
    "vector_sliders",
    "voice_rows",
    "voices_from_rows",
    "voices_from_yaml",
    "voices_tab",
    "with_vector_strengths",
]
