"""The workbench's Voices tab as pure functions: the editor table (add and remove rows, per-voice
sampling), YAML, and colours that stay put when the set changes (see ``colors.fill_colors``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..voices import VoiceSet, VoiceSetError, voice_set_from_dict
from .colors import fill_colors, safe_hex

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
    now, which voices keep (a new voice gets a colour nothing shows)."""
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


__all__ = [
    "VOICE_COLUMNS",
    "add_row",
    "remove_row",
    "table_rows",
    "voice_rows",
    "voices_from_rows",
    "voices_from_yaml",
]
