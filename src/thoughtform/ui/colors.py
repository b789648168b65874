"""Colours for voices in one session: declared ones keep theirs, each unknown voice gets its own."""

from __future__ import annotations

import colorsys
import hashlib
import re

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


class VoiceColors:
    """Assigns colours in first-seen order, so a replayed session gets the same colours."""

    def __init__(self, voices: VoiceSet) -> None:
        self.voices = voices
        self._assigned: dict[str, str] = {}
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
        cand = auto_color(name, self._taken).upper()
        if cand in self._taken:
            cand = next((c for c in EXTRA if c not in self._taken), "")
        k = 0
        while not cand or cand in self._taken:
            cand = _generated(name, k)
            k += 1
        self._assigned[key] = cand
        self._taken.add(cand)
        return cand


__all__ = ["EXTRA", "PALETTE", "VoiceColors", "safe_hex"]
