"""Terminal views with rich: a whole trace (:func:`render_terminal`) and a live stream of parser
events (:class:`LiveRenderer`).

Model text only ever reaches the console inside :class:`rich.text.Text` objects (never markup),
with control characters (ESC, CSI, bidi overrides, ...) replaced by visible ``⟨U+XXXX⟩`` chips
so a reply cannot drive the terminal or reorder what the reader sees.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.text import Text

from ..parse import Event, VoiceEnd, VoiceStart
from ..parse import Text as TextEvent
from ..trace import Trace
from ..voices import VoiceSet, resolve_voice_set
from . import (
    Block,
    build_blocks,
    control_label,
    prob_bucket,
    safe_color,
    split_controls,
    trace_voices,
)

__all__ = ["BUCKET_BG", "LiveRenderer", "label_text", "render_terminal", "voice_style"]

LABEL_MAX = 80

# Background per probability bucket (0 = likely, unshaded ... 5 = p < 0.01); None = unknown.
BUCKET_BG: tuple[str | None, ...] = (None, "#3A3000", "#5A3A00", "#7A3000", "#8A1A10", "#A00020")
_UNKNOWN_BG = "#303030"
_CONTROL_STYLE = Style(dim=True, reverse=True)
_MARKER_STYLE = Style(dim=True)


def _rgb(hex_color: str) -> Color:
    # Colours are validated before they get here; build from numbers, never from a parsed string.
    h = safe_color(hex_color)
    return Color.from_rgb(int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16))


def voice_style(voices: VoiceSet, name: str) -> Style:
    """The foreground style of a voice's text."""
    return Style(color=_rgb(voices.color_of(name)))


def _append(out: Text, s: str, style: Style) -> None:
    """Append model text, controls as visible chips."""
    for piece, ctrl in split_controls(s):
        if ctrl:
            out.append(f"⟨{control_label(piece)}⟩", style + _CONTROL_STYLE)
        else:
            out.append(piece, style)


def label_text(voices: VoiceSet, name: str) -> Text:
    """The label line of a voice: ``[Name]`` and its glyph, bold in the voice colour."""
    style = voice_style(voices, name) + Style(bold=True)
    short = name if len(name) <= LABEL_MAX else name[: LABEL_MAX - 1] + "…"
    out = Text()
    _append(out, f"[{short}]", style)
    glyph = voices.voice(name).glyph[:4]
    if glyph:
        out.append(" ")
        _append(out, glyph, style)
    return out


def _block_text(block: Block, voices: VoiceSet, tokens: bool) -> Text:
    base = voice_style(voices, block.voice)
    out = Text()
    if not tokens:
        _append(out, block.text, base)
        return out
    toks = block.tokens
    lead = 0
    # Leading whitespace-only tokens (after a close marker) would only add blank lines.
    while lead < len(toks) and not toks[lead].text.strip():
        lead += 1
    for t in toks[lead:]:
        b = prob_bucket(t.logprob)
        bg = _UNKNOWN_BG if b is None else BUCKET_BG[b]
        style = base + Style(bgcolor=_rgb(bg)) if bg else base
        if t.index in block.marker_tokens:
            style = style + _MARKER_STYLE
        _append(out, t.text, style)
    out.rstrip()
    return out


def render_terminal(
    trace: Trace,
    voices: VoiceSet | str | None = None,
    console: Console | None = None,
    tokens: bool = False,
) -> None:
    """Print a trace: per shown block a ``[Voice]`` label line in its colour, then its text;
    with ``tokens`` each token's background shows its probability."""
    vs = trace_voices(trace, voices)
    con = console or Console()
    tokens = bool(tokens and trace.tokens)
    for i, block in enumerate(build_blocks(trace, vs, tokens=tokens)):
        if i:
            con.print()
        con.print(label_text(vs, block.voice), markup=False, highlight=False, emoji=False)
        # soft_wrap: the terminal wraps, as it does for the live renderer's pieces (rich would
        # fold a word longer than the width differently from text printed piece by piece).
        con.print(
            _block_text(block, vs, tokens),
            soft_wrap=True,
            markup=False,
            highlight=False,
            emoji=False,
        )


class LiveRenderer:
    """Prints parser events as they stream: a label line when a voice starts saying something,
    then its text in the voice colour. Whitespace-only voices print nothing."""

    def __init__(self, console: Console, voices: VoiceSet | str | None = None) -> None:
        self.console = console
        self.voices = resolve_voice_set(voices)
        self._voice: str | None = None
        self._labelled = False  # the open voice's label is printed
        self._held = ""  # whitespace held back: printed only if more text follows in the voice
        self._at_line_start = True
        self._printed_any = False

    def _out(self, text: Text) -> None:
        if not text.plain:
            return
        # soft_wrap: pieces arrive one by one, so let the terminal wrap, not rich.
        self.console.print(text, end="", soft_wrap=True, markup=False, highlight=False, emoji=False)
        self._at_line_start = text.plain.endswith("\n")

    def _newline(self) -> None:
        if not self._at_line_start:
            self._out(Text("\n"))

    def on_events(self, events: Iterable[Event]) -> None:
        """Print what these events add."""
        for ev in events:
            if isinstance(ev, VoiceStart):
                self._voice = ev.voice
                self._labelled = False
                self._held = ""
            elif isinstance(ev, TextEvent):
                self._text(ev.voice, ev.text)
            elif isinstance(ev, VoiceEnd):
                if self._labelled:
                    self._newline()
                self._voice = None
                self._labelled = False
                self._held = ""

    def _text(self, voice: str, s: str) -> None:
        if voice != self._voice:  # defensive: text without its start event
            self._voice, self._labelled, self._held = voice, False, ""
        body = s.rstrip()
        if not body:
            if self._labelled:
                self._held += s
            return
        if not self._labelled:
            body = body.lstrip()
            self._newline()
            if self._printed_any:
                self._out(Text("\n"))
            label = label_text(self.voices, voice)
            label.append("\n")
            self._out(label)
            self._labelled = True
            self._printed_any = True
            lead = ""
        else:
            lead = self._held
        self._held = s[len(s.rstrip()) :]
        out = Text()
        _append(out, lead + body, voice_style(self.voices, voice))
        self._out(out)

    def close(self) -> None:
        """End the last line."""
        self._newline()
