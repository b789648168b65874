"""thoughtform: see and steer the inner voices of a language model."""

from __future__ import annotations

from .parse import Segment, SegmentBuilder, VoiceParser, parse_text
from .trace import Alternative, TokenRecord, Trace, load_trace
from .voices import PRESETS, Voice, VoiceSet, load_voice_set, resolve_voice_set

__version__ = "0.1.0"

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
