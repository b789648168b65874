"""Colours for voices in one session: declared ones keep theirs, each unknown voice gets its own."""

from __future__ import annotations

import colorsys
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..voices import MAIN_COLOR, PALETTE, VoiceSet, auto_color

_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")

# Used after the palette runs out (the seed set takes all eight): mid-tone colours that keep
# >= 3:1 contrast on white and on near-black like the palette does.
EXTRA: tuple[str, ...] = (
    "#8A7000",
    "#00838F",
    "#C0392B",
    "#5B8C00",
    "#7D5BA6",
    "#B3541E",
    "#2E86C1",
    "#A04070",
)


def safe_hex(value: object, fallback: str = MAIN_COLOR) -> str:
    """``value`` when it is a ``#RRGGBB`` colour, else ``fallback`` (colours reach CSS only so)."""
    if isinstance(value, str) and _HEX.match(value):
        return value.upper()
    return fallback


def _generated(name: str, k: int) -> str:
    """A deterministic extra colour: hue from the name's hash stepped by the golden angle."""
    h = int(hashlib.sha1(name.casefold().encode("utf-8", "surrogatepass")).hexdigest(), 16)
    hue = ((h % 360) + k * 137.508) % 360 / 360
    r, g, b = colorsys.hls_to_rgb(hue, 0.45, 0.65)
    return f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}"


def fresh_color(name: str, taken: Iterable[str]) -> str:
    """A colour for a new voice that no colour in ``taken`` already is: the palette colour its
    name hashes to (or the next free one), then the extra colours, then generated ones."""
    used = {c.upper() for c in taken} | {MAIN_COLOR.upper()}
    cand = auto_color(name, used).upper() if name else ""
    if not name:
        cand = next((c for c in PALETTE if c.upper() not in used), "")
    if not cand or cand in used:
        cand = next((c for c in EXTRA if c not in used), "")
    k = 0
    while not cand or cand in used:
        cand = _generated(name, k)
        k += 1
    return cand


def fill_colors(data: dict[str, Any], shown: Mapping[str, str]) -> dict[str, Any]:
    """A voice-set mapping with a colour for every voice, none of the others changed.

    ``shown`` is what the session shows now (declared and undeclared voices alike). A voice it
    already shows keeps that colour when it gets declared; a new voice takes one that nothing
    shows. Hashing a new name into the palette regardless of what was shown (what happened
    before) could take the colour an undeclared voice had, and the undeclared voices, coloured
    first come first served from what is left, then all moved: adding "Witness" recoloured
    Inner and Role."""
    voices = data.get("voices")
    if not isinstance(voices, list):
        return data
    shown_by_key = {str(k).casefold(): safe_hex(v) for k, v in shown.items()}
    entries = [v if isinstance(v, dict) else {"name": v} for v in voices]
    taken = {safe_hex(v.get("color"), "") for v in entries if v.get("color")} - {""}
    taken |= set(shown_by_key.values())
    out = []
    for v in entries:
        name = str(v.get("name") or "")
        if not v.get("color") and name:
            old = shown_by_key.get(name.casefold())
            if (
                old
                and old != MAIN_COLOR
                and old
                not in {
                    safe_hex(x.get("color"), "") for x in entries if x is not v and x.get("color")
                }
            ):
                v = {**v, "color": old}
            else:
                v = {**v, "color": fresh_color(name, taken)}
            taken.add(v["color"])
        out.append(v)
    return {**data, "voices": out}


class VoiceColors:
    """Assigns colours in first-seen order, so a replayed session gets the same colours."""

    def __init__(self, voices: VoiceSet) -> None:
        self.voices = voices
        self._assigned: dict[str, str] = {}
        self._names: dict[str, str] = {}  # casefolded -> as first seen
        self._taken: set[str] = {MAIN_COLOR.upper()}
        for v in voices.voices:
            self._taken.add(safe_hex(voices.color_of(v.name)))

    def color(self, name: str) -> str:
        """The colour of voice ``name`` (assigning a fresh one to an unknown voice)."""
        if name == self.voices.default_voice:
            return MAIN_COLOR
        if self.voices.get(name) is not None:
            return safe_hex(self.voices.color_of(name))
        key = name.casefold()
        got = self._assigned.get(key)
        if got is not None:
            return got
        cand = fresh_color(name, self._taken)
        self._assigned[key] = cand
        self._names[key] = name
        self._taken.add(cand)
        return cand

    def shown(self) -> dict[str, str]:
        """Every voice coloured so far: the declared ones and the undeclared ones seen."""
        out = {v.name: safe_hex(self.voices.color_of(v.name)) for v in self.voices.voices}
        out.update({self._names[k]: c for k, c in self._assigned.items()})
        return out


__all__ = ["EXTRA", "PALETTE", "VoiceColors", "fill_colors", "fresh_color", "safe_hex"]
