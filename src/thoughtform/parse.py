"""A sans-I/O incremental voice parser: ``feed(piece) -> events``, ``close() -> events``.

Shape borrowed from httpx's incremental decoders: each call scans only the new text plus a
held-back tail that might still become a marker (never longer than the longest marker), so the
total work is O(n) and the result does not depend on how the input was split.

Rules (see README, "Voice markers"; tests/test_parse.py holds a whole-text reference version):
- ``[Name]`` opens a voice at the start of a line (after optional spaces/tabs), not when followed
  by ``(`` (a Markdown link); an optional ``:`` after it belongs to the marker. Name is a declared
  name or alias (any case; the declared spelling is used) or, in lenient sets, any well-formed
  name (the first spelling seen is used; ``[Main]`` means the default voice).
- ``[/Name]`` anywhere closes the open voice ``Name``; what follows belongs to the default voice.
- ``<name>`` / ``</name>`` open and close tag-syntax voices anywhere in a line.
- Inside a fenced code block (3+ ``` or ~~~ at a line start, closed by a line of at least as many
  of the same character and only spaces after) nothing is a marker.
- Only a line feed ends a line (CRLF works; a lone CR does not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .voices import MAX_NAME_LEN, VoiceSet, is_name_char, is_valid_name, resolve_voice_set

__all__ = [
    "Event",
    "Segment",
    "SegmentBuilder",
    "Text",
    "VoiceEnd",
    "VoiceParser",
    "VoiceStart",
    "parse_text",
    "rebuild",
]


@dataclass(slots=True)
class VoiceStart:
    """A voice began: its marker text (``""`` when implicit) and where its content starts."""

    voice: str
    start: int
    marker: str = ""
    marker_start: int = 0
    tokens: tuple[int, ...] = ()


@dataclass(slots=True)
class Text:
    """Content appended to the open voice, with its offset and the tokens it came from."""

    voice: str
    text: str
    start: int
    tokens: tuple[int, ...] = ()


@dataclass(slots=True)
class VoiceEnd:
    """The open voice ended at ``end``; ``marker`` is the close marker text, if one closed it."""

    voice: str
    end: int
    marker: str = ""
    tokens: tuple[int, ...] = ()


Event = VoiceStart | Text | VoiceEnd

_NEED = 0  # could still become a marker: hold back
_NO = 1  # not a marker
_MATCH = 2

# Characters that can begin something interesting in the middle of a line.
_SPECIAL = re.compile(r"[\n\[<]")
_SPECIAL_NO_TAGS = re.compile(r"[\n\[]")


class VoiceParser:
    """Incremental, split-invariant, lossless voice parser over a :class:`VoiceSet`."""

    def __init__(self, voices: VoiceSet | str | None = None, starts_in: str | None = None) -> None:
        self.voices = resolve_voice_set(voices)
        self._main = self.voices.default_voice
        self._max_name = max(
            [MAX_NAME_LEN] + [len(k) for v in self.voices.voices for k in (v.name, *v.aliases)]
        )
        tags: list[tuple[str, str, bool]] = []
        for v in self.voices.tag_voices:
            for key in (v.name, *v.aliases):
                tags.append((f"<{key.lower()}>", v.name, False))
                tags.append((f"</{key.lower()}>", v.name, True))
        self._tags = tags
        self._tag_len = max((len(t[0]) for t in tags), default=0)
        self._tag_second = frozenset(c for t in tags for c in (t[0][1], t[0][1].upper()))
        self._special = _SPECIAL if tags else _SPECIAL_NO_TAGS
        self._unknown: dict[str, str] = {}
        self._pending = ""
        self._pos = 0  # absolute offset of _pending[0]
        self._marks: list[tuple[int, int | None]] = []  # (offset, token) where tokens begin
        self._cur = self._main
        if starts_in:
            self._cur = self._canonical(starts_in, register=True) or starts_in
        self._open = False
        self._line_start = True
        self._run_char = ""
        self._run_len = 0
        self._fence: tuple[str, int] | None = None
        self._fence_close = False
        self._closed = False
        self._plain = False

    # -- public API ---------------------------------------------------------------------

    @property
    def voice(self) -> str:
        """The voice that text fed now would belong to."""
        return self._cur

    @property
    def emitted(self) -> int:
        """Characters already turned into events (everything before the held-back tail)."""
        return self._pos

    @property
    def offset(self) -> int:
        """Characters consumed so far, including the held-back tail."""
        return self._pos + len(self._pending)

    def feed(self, piece: str, token: int | None = None) -> list[Event]:
        """Feed the next piece of text (optionally the index of the token it came from)."""
        if self._plain and type(piece) is str and piece and self._special.search(piece) is None:
            # Fast path: plain text in the middle of a line, nothing held back, no fence.
            pos = self._pos
            self._marks = [(pos, token)]
            tok = () if token is None else (token,)
            self._pos = pos + len(piece)
            if self._open:
                return [Text(self._cur, piece, pos, tok)]
            self._open = True
            return [VoiceStart(self._cur, pos, "", pos, tok), Text(self._cur, piece, pos, tok)]
        out: list[Event] = []
        if self._closed or not isinstance(piece, str) or not piece:
            return out
        self._marks.append((self._pos + len(self._pending), token))
        s = self._pending + piece
        keep = self._scan(s, False, out)
        self._advance(s, keep)
        return out

    def close(self) -> list[Event]:
        """Flush what was held back and end the open voice."""
        out: list[Event] = []
        if self._closed:
            return out
        s = self._pending
        keep = self._scan(s, True, out) if s else 0
        self._advance(s, keep)
        if self._open:
            out.append(VoiceEnd(self._cur, self._pos, "", ()))
            self._open = False
        self._closed = True
        self._plain = False
        return out

    # -- scanning -----------------------------------------------------------------------

    def _advance(self, s: str, keep: int) -> None:
        self._pos += keep
        self._pending = s[keep:]
        # Whether the next piece may take the fast path (re-derived after every scan).
        self._plain = not (
            self._pending or self._line_start or self._run_char or self._fence or self._closed
        )
        marks = self._marks
        # Drop token marks that lie wholly before the new position, keeping the one in force.
        k = 0
        while k + 1 < len(marks) and marks[k + 1][0] <= self._pos:
            k += 1
        if k:
            del marks[:k]

    def _tokens(self, a: int, b: int) -> tuple[int, ...]:
        """Token indices whose characters intersect the absolute span [a, b)."""
        marks = self._marks
        out: list[int] = []
        for k, (off, tok) in enumerate(marks):
            nxt = marks[k + 1][0] if k + 1 < len(marks) else None
            if tok is None or off >= b:
                continue
            if nxt is not None and nxt <= a:
                continue
            if out and out[-1] == tok:
                continue
            out.append(tok)
        return tuple(out)

    def _emit_text(self, s: str, a: int, b: int, out: list[Event]) -> None:
        if b <= a:
            return
        base = self._pos
        toks = self._tokens(base + a, base + b)
        if not self._open:
            out.append(VoiceStart(self._cur, base + a, "", base + a, toks))
            self._open = True
        out.append(Text(self._cur, s[a:b], base + a, toks))

    def _switch(self, s: str, j: int, e: int, voice: str, close: bool, out: list[Event]) -> None:
        """Apply a marker s[j:e] that opens (or closes) ``voice``."""
        base = self._pos
        toks = self._tokens(base + j, base + e)
        if close:
            if not self._open:
                out.append(VoiceStart(self._cur, base + j, "", base + j, ()))
            out.append(VoiceEnd(self._cur, base + j, s[j:e], toks))
            self._cur = self._main
            self._open = False
            return
        if self._open:
            out.append(VoiceEnd(self._cur, base + j, "", ()))
        out.append(VoiceStart(voice, base + e, s[j:e], base + j, toks))
        self._cur = voice
        self._open = True

    def _newline(self) -> None:
        if self._fence is not None and self._fence_close:
            self._fence = None
        self._fence_close = False
        self._line_start = True

    def _end_run(self) -> None:
        c, k = self._run_char, self._run_len
        self._run_char = ""
        self._run_len = 0
        if k < 3:
            return
        if self._fence is None:
            self._fence = (c, k)
        elif self._fence[0] == c and k >= self._fence[1]:
            self._fence_close = True

    def _scan(self, s: str, final: bool, out: list[Event]) -> int:
        """Scan ``s`` (held-back tail + new piece); emit events; return where to hold back."""
        n = len(s)
        i = 0
        emit_from = 0
        hold = n
        special = self._special
        while i < n:
            if self._run_char:
                c = self._run_char
                j = i
                while j < n and s[j] == c:
                    j += 1
                self._run_len += j - i
                i = j
                if i == n:
                    break
                self._end_run()
                continue
            if self._line_start:
                while i < n and (s[i] == " " or s[i] == "\t"):
                    i += 1
                if i == n:
                    break
                c = s[i]
                if c == "`" or c == "~":
                    self._line_start = False
                    self._run_char = c
                    continue
                if c == "[" and self._fence is None:
                    st, e, voice, close = self._match_bracket(s, i, final, True)
                    if st == _NEED:
                        hold = i
                        break
                    if st == _MATCH:
                        self._emit_text(s, emit_from, i, out)
                        self._switch(s, i, e, voice, close, out)
                        emit_from = i = e
                        self._line_start = False
                        continue
                    self._line_start = False
                    i += 1
                    continue
                self._line_start = False
                continue
            if self._fence is not None:
                nl = s.find("\n", i)
                stop = n if nl < 0 else nl
                if self._fence_close and s[i:stop].strip(" \t\r"):
                    self._fence_close = False
                if nl < 0:
                    i = n
                    break
                i = nl + 1
                self._newline()
                continue
            m = special.search(s, i)
            if m is None:
                i = n
                break
            j = m.start()
            c = s[j]
            if c == "\n":
                i = j + 1
                self._newline()
                continue
            if c == "[":
                if j + 1 < n and s[j + 1] != "/":
                    i = j + 1
                    continue
                st, e, voice, close = self._match_bracket(s, j, final, False)
            else:
                st, e, voice, close = self._match_tag(s, j, final)
            if st == _NEED:
                hold = j
                break
            if st == _NO:
                i = j + 1
                continue
            self._emit_text(s, emit_from, j, out)
            self._switch(s, j, e, voice, close, out)
            emit_from = i = e
        if final and self._run_char:
            self._end_run()
        self._emit_text(s, emit_from, hold, out)
        return hold

    def _canonical(self, name: str, register: bool) -> str | None:
        """The voice a bracket name refers to: declared spelling, or lenient unknown name."""
        v = self.voices.get(name)
        if v is not None:
            return v.name
        if self.voices.unknown != "lenient" or not is_valid_name(name):
            return None
        key = name.casefold()
        if key == self._main.casefold():
            # "[Main]" means the default voice, not a new voice that merely looks like it.
            return self._main
        known = self._unknown.get(key)
        if known is not None:
            return known
        if register:
            self._unknown[key] = name
        return name

    def _match_bracket(
        self, s: str, j: int, final: bool, allow_open: bool
    ) -> tuple[int, int, str, bool]:
        n = len(s)
        k = j + 1
        close = k < n and s[k] == "/"
        if close:
            k += 1
        elif not allow_open:
            return (_NEED if k >= n and not final else _NO), 0, "", False
        limit = self._max_name
        # A name is at most ``limit`` characters, so its "]" lies within reach (C-speed search).
        p = s.find("]", k, k + limit + 1)
        if p < 0:
            if final or n > k + limit:
                return _NO, 0, "", False
            name = s[k:]
            ok = not name or (name[0].isalpha() and all(is_name_char(ch) for ch in name))
            return (_NEED if ok else _NO), 0, "", False
        name = s[k:p]
        if not name:
            return _NO, 0, "", False
        e = p + 1
        if e == n and not final:
            return _NEED, 0, "", False
        if e < n and s[e] == "(":
            return _NO, 0, "", False
        if close:
            voice = self._canonical(name, register=False)
            if voice is None or voice != self._cur or voice == self._main:
                return _NO, 0, "", False
            return _MATCH, e, voice, True
        voice = self._canonical(name, register=True)
        if voice is None:
            return _NO, 0, "", False
        if e < n and s[e] == ":":
            e += 1
        return _MATCH, e, voice, False

    def _match_tag(self, s: str, j: int, final: bool) -> tuple[int, int, str, bool]:
        n = len(s)
        if j + 1 < n and s[j + 1] not in self._tag_second:
            return _NO, 0, "", False  # cheap reject: "<" followed by what starts no tag
        chunk = s[j : j + self._tag_len]
        if not chunk.isascii():
            # Non-ASCII never matches an ASCII tag, and .lower() must not fold it into one
            # (U+212A KELVIN SIGN lowers to "k"): keep only the ASCII head.
            chunk = chunk[: next(q for q, ch in enumerate(chunk) if ord(ch) > 127)]
        low = chunk.lower()
        more = j + len(low) == n and not final  # the chunk runs to the end: more may come
        need = False
        for marker, voice, close in self._tags:
            if low.startswith(marker):
                if not close or voice == self._cur:
                    return _MATCH, j + len(marker), voice, close
            elif more and marker.startswith(low):
                need = True
        return (_NEED if need else _NO), 0, "", False


@dataclass
class Segment:
    """A run of one voice: ``start``/``end`` bound its raw content; ``text`` is it stripped."""

    voice: str
    text: str
    start: int
    end: int
    marker: str = ""
    close_marker: str = ""
    tokens: tuple[int, ...] = ()
    raw_parts: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def raw(self) -> str:
        """The unstripped content."""
        return "".join(self.raw_parts)

    def to_dict(self) -> dict[str, object]:
        """The four public keys: voice, text, start, end."""
        return {"voice": self.voice, "text": self.text, "start": self.start, "end": self.end}


class SegmentBuilder:
    """Folds parser events into segments (keeps the open one up to date for live views)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self._open: Segment | None = None

    @property
    def current(self) -> Segment | None:
        """The segment still open, if any."""
        return self._open

    def add(self, events: Iterable[Event]) -> None:
        """Apply events in order."""
        for ev in events:
            if isinstance(ev, Text):
                seg = self._open
                if seg is None:  # defensive: parser always opens first
                    seg = self._start(VoiceStart(ev.voice, ev.start, "", ev.start))
                seg.raw_parts.append(ev.text)
                seg.end = ev.start + len(ev.text)
                if ev.tokens:
                    seg.tokens = _merge_tokens(seg.tokens, ev.tokens)
            elif isinstance(ev, VoiceStart):
                self._start(ev)
            else:
                seg = self._open
                if seg is not None:
                    seg.end = ev.end
                    seg.close_marker = ev.marker
                    seg.text = seg.raw.strip()
                    if ev.tokens:
                        seg.tokens = _merge_tokens(seg.tokens, ev.tokens)
                self._open = None

    def _start(self, ev: VoiceStart) -> Segment:
        seg = Segment(ev.voice, "", ev.start, ev.start, ev.marker, "", tuple(ev.tokens))
        self.segments.append(seg)
        self._open = seg
        return seg


def _merge_tokens(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a:
        return (b[0], b[-1]) if len(b) > 1 else (b[0],)
    lo = min(a[0], b[0])
    hi = max(a[-1], b[-1])
    return (lo, hi) if hi != lo else (lo,)


def iter_chunks(text: str, size: int) -> Iterator[str]:
    """``text`` cut into pieces of ``size`` characters."""
    for i in range(0, len(text), max(1, size)):
        yield text[i : i + size]


def parse_text(
    text: str,
    voices: VoiceSet | str | None = None,
    starts_in: str | None = None,
    chunk: int | None = None,
) -> list[Segment]:
    """Parse a whole text into segments (optionally feeding ``chunk`` characters at a time)."""
    parser = VoiceParser(voices, starts_in=starts_in)
    builder = SegmentBuilder()
    pieces = iter_chunks(text, chunk) if chunk else [text]
    for piece in pieces:
        builder.add(parser.feed(piece))
    builder.add(parser.close())
    return builder.segments


def rebuild(events: Iterable[Event]) -> str:
    """The exact input, rebuilt from marker texts and content (the lossless invariant)."""
    parts: list[str] = []
    for ev in events:
        if isinstance(ev, Text):
            parts.append(ev.text)
        else:
            parts.append(ev.marker)
    return "".join(parts)
