"""thoughtform: see and steer the inner voices of a language model."""

from __future__ import annotations

from .parse import Segment, SegmentBuilder, VoiceParser, parse_text
from .trace import Alternative, TokenRecord, Trace, load_trace
from .voices import PRESETS, Voice, VoiceSet, load_voice_set, resolve_voice_set

__version__ = "0.1.0"


def _register_notebook_display() -> None:
    """In IPython/Jupyter, show a Trace as its HTML fragment. Registered here, above both
    layers, so ``trace`` never imports ``render`` (the layers stay one-way)."""
    import sys

    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    if shell is None:
        return

    def html(trace: Trace) -> str:
        from .render.html import render_fragment

        return render_fragment(trace)

    shell.display_formatter.formatters["text/html"].for_type(Trace, html)


_register_notebook_display()

__all__ = [
    "PRESETS",
    "Alternative",
    "Segment",
    "SegmentBuilder",
    "TokenRecord",
    "Trace",
    "Voice",
    "VoiceParser",
    "VoiceSet",
    "__version__",
    "load_trace",
    "load_voice_set",
    "parse_text",
    "resolve_voice_set",
]
