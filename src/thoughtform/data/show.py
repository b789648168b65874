"""Show dataset examples in the terminal, replies coloured by voice (model text is never markup)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from ..parse import Segment
from ..voices import VoiceSet, resolve_voice_set
from . import formats as F
from .lines import DEFAULT_MAX_LINE_BYTES
from .validate import Entry, iter_dataset

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

# Terminal control characters (ESC above all) would let a dataset drive the terminal: show them.
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """``text`` with control characters (other than newline and tab) shown as ``\\xNN``."""
    return _CTRL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def reply_text(content: str, segments: list[Segment], vs: VoiceSet) -> Text:
    """An assistant reply as rich Text: markers dim, each voice's text in its colour."""
    from rich.text import Text

    out = Text()
    pos = 0
    for seg in segments:
        color = vs.color_of(seg.voice)
        ms = seg.start - len(seg.marker)
        if ms > pos:
            out.append(safe(content[pos:ms]))
        if seg.marker:
            out.append(safe(seg.marker), style=f"bold {color}")
        out.append(safe(content[seg.start : seg.end]), style=color)
        pos = seg.end
        if seg.close_marker:
            out.append(safe(content[pos : pos + len(seg.close_marker)]), style=f"dim {color}")
            pos += len(seg.close_marker)
    if pos < len(content):
        out.append(safe(content[pos:]))
    return out


def render_entry(e: Entry, vs: VoiceSet) -> RenderableType:
    """One example as a panel titled ``PATH:LINE``, with its issues, if any, underneath."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    parts: list[RenderableType] = []
    if e.record is not None:
        replies = iter(e.record.replies)
        for m in e.record.messages:
            role = Text(m["role"], style="bold")
            parts.append(role)
            if m["role"] == "assistant":
                parts.append(reply_text(m["content"], next(replies, []), vs))
            else:
                parts.append(Text(safe(m["content"])))
    for i in e.issues:
        style = "yellow" if i.severity == "warning" else "red"
        parts.append(Text(safe(i.format()), style=style))
    border = "green" if e.ok else "red"
    return Panel(Group(*parts), title=Text(safe(f"{e.path}:{e.line}")), border_style=border)


def show(
    paths: Iterable[str | Path],
    voices: VoiceSet | str | None = "seed",
    start: int = 1,
    n: int = 3,
    strict: bool = False,
    fmt: F.Format | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    console: Console | None = None,
) -> int:
    """Print ``n`` entries starting at line ``start`` (of the first file); return how many."""
    from rich.console import Console

    vs = resolve_voice_set(voices)
    con = console or Console()
    entries = (e for e in iter_dataset(paths, vs, strict, fmt, max_line_bytes) if e.line >= start)
    shown = 0
    for e in islice(entries, n):
        con.print(render_entry(e, vs))
        shown += 1
    return shown
