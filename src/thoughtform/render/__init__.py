"""Shared rendering model: transcripts as traces, voice blocks, probability buckets, control chars.

The HTML and terminal renderers both draw the same list of :class:`Block`; this module stays
stdlib-only so ``import thoughtform`` stays light.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..parse import Segment, parse_text
from ..trace import TokenRecord, Trace
from ..voices import MAIN_COLOR, PRESETS, VoiceSet, resolve_voice_set, voice_set_from_dict

__all__ = [
    "Block",
    "build_blocks",
    "prob_bucket",
    "render_fragment",
    "render_report",
    "safe_color",
    "split_controls",
    "trace_from_text",
    "trace_voices",
]

_HEX = re.compile(r"^#[0-9A-Fa-f]{6}$")

# Characters a reader cannot see but that change what text means or how it displays: C0/C1
# controls (ESC drives terminals), DEL, bidi embeddings/overrides/isolates (Trojan Source),
# zero-width space, word joiner, BOM, line/paragraph separators. ZWJ/ZWNJ stay (emoji, scripts).
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2028\u2029\u2060\u2066-\u2069\ufeff"
    "\ud800-\udfff]"
)

# Upper bounds of the probability buckets; a token with p >= 0.9 gets bucket 0 (no shade).
BUCKET_EDGES: tuple[float, ...] = (0.9, 0.6, 0.3, 0.1, 0.01)


def safe_color(value: str, fallback: str = MAIN_COLOR) -> str:
    """``value`` when it is a ``#RRGGBB`` hex colour, else ``fallback`` (colours reach CSS)."""
    return value.upper() if isinstance(value, str) and _HEX.fullmatch(value) else fallback


def prob_bucket(logprob: float | None) -> int | None:
    """Shade bucket 0 (p >= 0.9) to 5 (p < 0.01) of a token's logprob; None when unknown."""
    if logprob is None or not math.isfinite(logprob):
        return None
    p = math.exp(min(logprob, 0.0))
    for i, edge in enumerate(BUCKET_EDGES):
        if p >= edge:
            return i
    return len(BUCKET_EDGES)


def control_label(ch: str) -> str:
    """How an invisible character is shown: its code point, e.g. ``U+202E``."""
    return f"U+{ord(ch):04X}"


def split_controls(text: str) -> list[tuple[str, bool]]:
    """``text`` as (piece, is_control) runs: controls come one per piece; CR before LF is dropped."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _CONTROL.finditer(text):
        a = m.start()
        ch = m.group()
        if a > pos:
            out.append((text[pos:a], False))
        pos = a + 1
        if ch == "\r" and text.startswith("\n", pos):
            continue  # CRLF: the newline alone says it
        out.append((ch, True))
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def trace_from_text(
    text: str, voices: VoiceSet | str | None = None, starts_in: str | None = None
) -> Trace:
    """A transcript trace: ``text`` parsed into voice segments (no tokens)."""
    vs = resolve_voice_set(voices)
    return Trace(
        meta={
            "kind": "transcript",
            "voices": vs.name,
            "voice_set": vs.to_dict(),
            "starts_in": starts_in,
        },
        segments=parse_text(text, vs, starts_in=starts_in),
        source_text=text,
    )


def trace_voices(trace: Trace, voices: VoiceSet | str | None = None) -> VoiceSet:
    """The voice set to draw ``trace`` with: the given one, the one saved in its meta, or seed."""
    if voices is not None:
        return resolve_voice_set(voices)
    saved = trace.meta.get("voice_set")
    if isinstance(saved, dict):
        try:
            return voice_set_from_dict(saved, "<trace meta>")
        except (ValueError, TypeError, AttributeError):
            pass  # a damaged saved set must not stop the render
    name = trace.meta.get("voices")
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    return PRESETS["seed"]


@dataclass
class Block:
    """One shown run of a voice: its text (transcripts) or its tokens (token mode)."""

    voice: str
    text: str = ""
    tokens: list[TokenRecord] = field(default_factory=list)
    # Indices of tokens that lie wholly inside a voice marker (drawn dimmed).
    marker_tokens: set[int] = field(default_factory=set)


def _starts_in(trace: Trace) -> str | None:
    s = trace.meta.get("starts_in")
    return s if isinstance(s, str) and s else None


def _segments(trace: Trace, vs: VoiceSet) -> list[Segment]:
    if trace.segments:
        return trace.segments
    return parse_text(trace.text, vs, starts_in=_starts_in(trace))


def _token_voices(trace: Trace, vs: VoiceSet) -> list[str]:
    """Each token's voice: recorded, or recovered by the pipeline's own rule (revoice)."""
    toks = trace.tokens
    if all(t.voice is not None for t in toks):
        return [t.voice or "" for t in toks]
    from ..generate import revoice

    return revoice(toks, vs, starts_in=_starts_in(trace))


def _marker_spans(segs: list[Segment]) -> tuple[list[tuple[int, int]], list[int]]:
    """Character spans of all markers, and the offsets where an explicit opener begins."""
    spans: list[tuple[int, int]] = []
    opens: list[int] = []
    for s in segs:
        if s.marker:
            spans.append((s.start - len(s.marker), s.start))
            opens.append(s.start - len(s.marker))
        if s.close_marker:
            spans.append((s.end, s.end + len(s.close_marker)))
    spans.sort()
    opens.sort()
    return spans, opens


def _token_blocks(trace: Trace, vs: VoiceSet) -> list[Block]:
    voices = _token_voices(trace, vs)
    spans, opens = _marker_spans(_segments(trace, vs))
    blocks: list[Block] = []
    cur: Block | None = None
    si = oi = 0
    a = 0
    for tok, voice in zip(trace.tokens, voices, strict=True):
        b = a + len(tok.text)
        # A new block where the voice changes, or where a marker re-opens the same voice.
        reopened = False
        while oi < len(opens) and opens[oi] <= a:
            reopened = True
            oi += 1
        if cur is None or voice != cur.voice or (reopened and cur.tokens):
            cur = Block(voice)
            blocks.append(cur)
        cur.tokens.append(tok)
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        if b > a and si < len(spans) and spans[si][0] <= a and b <= spans[si][1]:
            cur.marker_tokens.add(tok.index)
        a = b
    return [
        blk
        for blk in blocks
        if any(t.text.strip() for t in blk.tokens if t.index not in blk.marker_tokens)
    ]


def build_blocks(trace: Trace, voices: VoiceSet, tokens: bool = False) -> list[Block]:
    """The blocks to draw, whitespace-only ones left out: token runs when ``tokens`` and the
    trace has tokens, else one block per segment."""
    if tokens and trace.tokens:
        return _token_blocks(trace, voices)
    return [Block(s.voice, text=s.text) for s in _segments(trace, voices) if s.text.strip()]


def voice_order(blocks: list[Block], voices: VoiceSet) -> list[str]:
    """Voices that appear, in lane order (first appearance breaks ties)."""
    seen: dict[str, int] = {}
    for b in blocks:
        seen.setdefault(b.voice, len(seen))
    return sorted(seen, key=lambda v: (voices.voice(v).lane, seen[v]))


def meta_line(trace: Trace) -> list[tuple[str, str]]:
    """Short (label, value) facts about a trace for report headers (values are untrusted)."""
    m = trace.meta
    out: list[tuple[str, str]] = []
    for key in ("kind", "model", "backend", "voices", "created"):
        v: Any = m.get(key)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v):
            out.append((key, str(v)))
    if trace.tokens:
        out.append(("tokens", str(len(trace.tokens))))
    if trace.finish is not None:
        reason = trace.finish.get("reason")
        if isinstance(reason, str):
            out.append(("finish", reason))
    elif trace.interrupted:
        out.append(("finish", "interrupted"))
    return out


# At the bottom: html.py imports the helpers above from this package.
from .html import render_fragment, render_report  # noqa: E402
