"""The record of a generation or a parsed transcript: tokens, segments, metadata; JSONL on disk."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .parse import Segment

SCHEMA = 1


class TraceError(ValueError):
    """A trace file is invalid; the message names the file and line."""


def _num(x: Any) -> float | None:
    """A finite float or None (JSON has no NaN/inf; a NaN logprob means 'unknown')."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _jsonable(x: Any) -> Any:
    """``x`` made strict-JSON safe: non-finite floats become null, tuples lists, bytes hex,
    and anything else unknown its ``str`` (metadata must never stop a trace being written)."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).hex()
    return str(x)


def _meta_record(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta record; ``type`` and ``schema`` in ``meta`` cannot override the real ones."""
    rest = {k: v for k, v in meta.items() if k not in ("type", "schema")}
    return {"type": "meta", "schema": SCHEMA, **_jsonable(rest)}


def _round4(x: float) -> float | None:
    """A weight rounded for storage; NaN/inf become null."""
    f = _num(x)
    return None if f is None else round(f, 4)


def _weight(x: Any) -> float:
    """A stored weight: null (written for NaN/inf) reads back as NaN."""
    return math.nan if x is None else float(x)


@dataclass(slots=True)
class Alternative:
    """One of the top candidates at a step: its text, logprob and (when known) id and bytes."""

    text: str
    logprob: float | None
    token_id: int | None = None
    bytes: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: text, logprob, and token_id/bytes (hex) when known."""
        d: dict[str, Any] = {"text": self.text, "logprob": _num(self.logprob)}
        if self.token_id is not None:
            d["token_id"] = self.token_id
        if self.bytes is not None:
            d["bytes"] = self.bytes.hex()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alternative:
        """Inverse of :meth:`to_dict`."""
        b = d.get("bytes")
        return cls(
            text=str(d.get("text", "")),
            logprob=_num(d.get("logprob")),
            token_id=d.get("token_id") if isinstance(d.get("token_id"), int) else None,
            bytes=bytes.fromhex(b) if isinstance(b, str) else None,
        )


@dataclass(slots=True)
class AttentionSummary:
    """Where one generated token attended, compressed: per layer, mass per earlier segment
    plus the top source positions (so memory grows with tokens x layers, not tokens^2)."""

    # segment_mass[layer] = list of (segment index, mass); top[layer] = list of (position, weight)
    segment_mass: list[list[tuple[int, float]]]
    top: list[list[tuple[int, float]]]
    prompt_mass: list[float] = field(default_factory=list)
    # Positions in ``top`` are absolute (prompt + reply); reply token i sits at prompt_tokens + i.
    prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form, weights rounded to 4 decimals."""
        return {
            "segment_mass": [[[i, _round4(m)] for i, m in layer] for layer in self.segment_mass],
            "top": [[[p, _round4(w)] for p, w in layer] for layer in self.top],
            "prompt_mass": [_round4(x) for x in self.prompt_mass],
            "prompt_tokens": self.prompt_tokens,
        }

    def reply_index(self, position: int) -> int | None:
        """The reply token index of an absolute ``top`` position (None for prompt positions)."""
        i = position - self.prompt_tokens
        return i if i >= 0 else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionSummary:
        """Inverse of :meth:`to_dict`."""
        return cls(
            segment_mass=[[(int(i), _weight(m)) for i, m in layer] for layer in d["segment_mass"]],
            top=[[(int(p), _weight(w)) for p, w in layer] for layer in d["top"]],
            prompt_mass=[_weight(x) for x in d.get("prompt_mass") or []],
            prompt_tokens=int(d.get("prompt_tokens") or 0),
        )


@dataclass(slots=True)
class TokenRecord:
    """One generated token with its telemetry; nulls where the source had no data."""

    index: int
    text: str
    token_id: int | None = None
    logprob: float | None = None
    top: list[Alternative] = field(default_factory=list)
    entropy: float | None = None
    voice: str | None = None
    bytes: bytes | None = None
    attention: AttentionSummary | None = None
    lens: list[str] | None = None
    t: float | None = None
    steered: bool = False
    steered_logprob: float | None = None
    forced: bool = False
    vector: list[list[Any]] | None = None  # [[voice, strength], ...] in force at this token
    turn: int | None = None  # council traces: the index of the turn this token belongs to

    def to_dict(self) -> dict[str, Any]:
        """The JSONL token record."""
        d: dict[str, Any] = {
            "type": "token",
            "index": self.index,
            "text": self.text,
            "token_id": self.token_id,
            "logprob": _num(self.logprob),
            "top": [a.to_dict() for a in self.top],
            "entropy": _num(self.entropy),
            "voice": self.voice,
        }
        if self.bytes is not None:
            d["bytes"] = self.bytes.hex()
        if self.attention is not None:
            d["attention"] = self.attention.to_dict()
        if self.lens is not None:
            d["lens"] = [str(x) for x in self.lens]
        t = _num(self.t)
        if t is not None:
            d["t"] = round(t, 6)
        if self.steered or self.forced:
            d["steered"] = True
            d["steered_logprob"] = _num(self.steered_logprob)
            if self.forced:
                d["forced"] = True
        if self.vector:
            d["vector"] = self.vector
        if self.turn is not None:
            d["turn"] = self.turn
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenRecord:
        """Inverse of :meth:`to_dict` (raises KeyError/TypeError/ValueError on bad data)."""
        if not isinstance(d["index"], int) or isinstance(d["index"], bool):
            raise TypeError("'index' must be an integer")
        if not isinstance(d["text"], str):
            raise TypeError("'text' must be a string")
        top = d.get("top") or []
        if not isinstance(top, list) or not all(isinstance(a, dict) for a in top):
            raise TypeError("'top' must be a list of objects")
        tid = d.get("token_id")
        b = d.get("bytes")
        att = d.get("attention")
        return cls(
            index=d["index"],
            text=d["text"],
            token_id=tid if isinstance(tid, int) else None,
            logprob=_num(d.get("logprob")),
            top=[Alternative.from_dict(a) for a in top],
            entropy=_num(d.get("entropy")),
            voice=d.get("voice") if isinstance(d.get("voice"), str) else None,
            bytes=bytes.fromhex(b) if isinstance(b, str) else None,
            attention=AttentionSummary.from_dict(att) if isinstance(att, dict) else None,
            lens=[str(x) for x in d["lens"]] if isinstance(d.get("lens"), list) else None,
            t=_num(d.get("t")),
            steered=bool(d.get("steered")),
            steered_logprob=_num(d.get("steered_logprob")),
            forced=bool(d.get("forced")),
            vector=_vector(d.get("vector")),
            turn=_turn(d.get("turn")),
        )


def _turn(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _vector(x: Any) -> list[list[Any]] | None:
    if not isinstance(x, list):
        return None
    out = [
        [str(v[0]), float(v[1])]
        for v in x
        if isinstance(v, list) and len(v) == 2 and isinstance(v[1], (int, float))
    ]
    return out or None


def segment_to_record(seg: Segment) -> dict[str, Any]:
    """The JSONL segment record."""
    return {
        "type": "segment",
        "voice": seg.voice,
        "text": seg.text,
        "start": seg.start,
        "end": seg.end,
        "marker": seg.marker,
        "close_marker": seg.close_marker,
        "tokens": list(seg.tokens),
    }


def segment_from_record(d: dict[str, Any]) -> Segment:
    """Inverse of :func:`segment_to_record`."""
    for k in ("voice", "text"):
        if not isinstance(d.get(k), str):
            raise TypeError(f"'{k}' must be a string")
    for k in ("start", "end"):
        if not isinstance(d.get(k), int) or isinstance(d.get(k), bool):
            raise TypeError(f"'{k}' must be an integer")
    toks = d.get("tokens") or []
    return Segment(
        voice=d["voice"],
        text=d["text"],
        start=d["start"],
        end=d["end"],
        marker=str(d.get("marker", "")),
        close_marker=str(d.get("close_marker", "")),
        tokens=tuple(int(t) for t in toks),
    )


@dataclass
class Trace:
    """One generation or transcript: metadata, tokens, segments, and how it finished."""

    meta: dict[str, Any] = field(default_factory=dict)
    tokens: list[TokenRecord] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    source_text: str | None = None
    # Who-speaks-next records ({"type": "voice_choice", "token", "probs", "chosen", "forced"}),
    # one per voice boundary, kept as plain mappings (thoughtform.steer.VoiceChoice reads them).
    voice_choices: list[dict[str, Any]] = field(default_factory=list)
    # Council traces (thoughtform.council): one mapping per turn, as its {"type": "turn"} record
    # (index, voice, policy, probs, by, ...) opened it, with what its {"type": "turn_end"}
    # record said under "end" (absent while the turn is unfinished). Tokens carry ``turn``.
    turns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The full text: the transcript, or the generated tokens joined."""
        if self.source_text is not None:
            return self.source_text
        return "".join(t.text for t in self.tokens)

    @property
    def interrupted(self) -> bool:
        """True when the generation did not finish normally (no end record, error or cancel)."""
        if self.finish is None:
            return bool(self.tokens) or self.meta.get("kind") == "generation"
        return self.finish.get("reason") in ("cancelled", "error", "interrupted")

    def records(self) -> Iterator[dict[str, Any]]:
        """All JSONL records in file order."""
        yield _meta_record(self.meta)
        if self.source_text is not None:
            yield {"type": "text", "text": self.source_text}
        yield from self._token_records()
        for s in self.segments:
            yield segment_to_record(s)
        for c in self.voice_choices:
            yield {**c, "type": "voice_choice"}
        if self.finish is not None:
            yield _end_record(self.finish)

    def _token_records(self) -> Iterator[dict[str, Any]]:
        """Token records; in a council trace each turn's tokens between its turn records."""
        if not self.turns:
            for t in self.tokens:
                yield t.to_dict()
            return
        by_turn: dict[int, list[TokenRecord]] = {}
        loose: list[TokenRecord] = []
        for t in self.tokens:
            (by_turn.setdefault(t.turn, []) if t.turn is not None else loose).append(t)
        for turn in self.turns:
            yield turn_record(turn)
            for t in by_turn.pop(turn.get("index"), []):  # type: ignore[arg-type]
                yield t.to_dict()
            end = turn.get("end")
            if isinstance(end, dict):
                yield turn_end_record(turn.get("index"), end)
        rest = sorted(loose + [t for ts in by_turn.values() for t in ts], key=lambda t: t.index)
        for t in rest:
            yield t.to_dict()

    def to_jsonl(self) -> str:
        """The trace as JSONL text."""
        return "".join(_dumps(r) + "\n" for r in self.records())

    def save(self, path: str | Path) -> None:
        """Write the trace to ``path`` as JSONL."""
        Path(path).write_text(self.to_jsonl(), encoding="utf-8")


def turn_record(turn: dict[str, Any]) -> dict[str, Any]:
    """The record that opens a council turn (its ``end`` mapping goes in the turn_end record)."""
    rest = {k: v for k, v in turn.items() if k not in ("type", "end")}
    return {"type": "turn", **_jsonable(rest)}


def turn_end_record(index: Any, end: dict[str, Any]) -> dict[str, Any]:
    """The record that closes council turn ``index``: its text, finish reason, token span."""
    rest = {k: v for k, v in end.items() if k not in ("type", "index")}
    return {"type": "turn_end", "index": index, **_jsonable(rest)}


def _end_record(finish: dict[str, Any]) -> dict[str, Any]:
    """The end record (``type`` in ``finish`` cannot override it)."""
    return {"type": "end", **_jsonable({k: v for k, v in finish.items() if k != "type"})}


def _dumps(rec: Any) -> str:
    # ensure_ascii keeps lone surrogates and control characters representable in UTF-8 files.
    return json.dumps(rec, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


_str = json.encoder.encode_basestring_ascii  # json.dumps's own string encoder (ensure_ascii)
_INF = math.inf
_AltParts = dict[tuple[str, int | None, bytes | None], tuple[str, str]]


def _jnum(x: Any) -> str:
    """``_num(x)`` as json.dumps writes it."""
    if type(x) is float:
        return float.__repr__(x) if -_INF < x < _INF else "null"
    f = _num(x)
    return "null" if f is None else float.__repr__(f)


def token_line(rec: TokenRecord, parts: _AltParts | None = None) -> str:
    """``rec``'s JSONL line, character for character what ``_dumps(rec.to_dict())`` writes,
    built by hand: measured 21 -> 8 us a token warm (more after a decode), the most frequent
    line a trace writes. ``parts``: a cache of each alternative's fixed text around its
    logprob, kept by the writer. Records with attention or a logit lens (transformers only),
    or numbers of other types than int, take the generic path."""
    tid = rec.token_id
    if (
        rec.attention is not None
        or rec.lens is not None
        or type(rec.index) is not int
        or (tid is not None and type(tid) is not int)
        or (rec.turn is not None and type(rec.turn) is not int)
        or type(rec.text) is not str
        or (rec.voice is not None and type(rec.voice) is not str)
    ):
        return _dumps(rec.to_dict())
    if parts is None:
        parts = {}
    alts = []
    for a in rec.top:
        key = (a.text, a.token_id, a.bytes)
        p = parts.get(key)
        if p is None:
            aid = a.token_id
            if (aid is not None and type(aid) is not int) or type(a.text) is not str:
                return _dumps(rec.to_dict())
            if len(parts) >= 65_536:  # bounded by the vocabulary in practice
                parts.clear()
            p = parts[key] = (
                '{"text":' + _str(a.text) + ',"logprob":',
                ("" if aid is None else ',"token_id":' + int.__repr__(aid))
                + ("" if a.bytes is None else ',"bytes":"' + a.bytes.hex() + '"')
                + "}",
            )
        alts.append(p[0] + _jnum(a.logprob) + p[1])
    out = [
        '{"type":"token","index":',
        int.__repr__(rec.index),
        ',"text":',
        _str(rec.text),
        ',"token_id":',
        "null" if tid is None else int.__repr__(tid),
        ',"logprob":',
        _jnum(rec.logprob),
        ',"top":[',
        ",".join(alts),
        '],"entropy":',
        _jnum(rec.entropy),
        ',"voice":',
        "null" if rec.voice is None else _str(rec.voice),
    ]
    if rec.bytes is not None:
        out.append(',"bytes":"' + rec.bytes.hex() + '"')
    t = _num(rec.t)
    if t is not None:
        out.append(',"t":' + float.__repr__(round(t, 6)))
    if rec.steered or rec.forced:
        out.append(',"steered":true,"steered_logprob":' + _jnum(rec.steered_logprob))
        if rec.forced:
            out.append(',"forced":true')
    if rec.vector:
        out.append(',"vector":' + _dumps(rec.vector))
    if rec.turn is not None:
        out.append(',"turn":' + int.__repr__(rec.turn))
    out.append("}")
    return "".join(out)


def is_trace_text(head: str) -> bool:
    """Whether text looks like a trace JSONL (its first line is a meta record)."""
    first = head.lstrip("\ufeff").split("\n", 1)[0].strip()
    if not first.startswith("{"):
        return False
    try:
        rec = json.loads(first)
    except ValueError:
        return '"type":"meta"' in first.replace(" ", "")
    return isinstance(rec, dict) and rec.get("type") == "meta"


def parse_trace_lines(
    lines: Iterable[str | bytes] | str,
    source: str = "<trace>",
    errors: list[str] | None = None,
) -> Trace:
    """Build a trace from JSONL lines (str, or bytes decoded as UTF-8; a whole str is split).

    Bad lines raise TraceError naming ``source`` and the line, or, when ``errors`` is a list,
    are reported into it (``"source:line: reason"``) and skipped, keeping every valid record.
    A torn last line (no newline after it, as a crash mid-write leaves) is not an error: the
    trace simply has no end record and loads as interrupted.
    """
    if isinstance(lines, str):
        lines = io.StringIO(lines, newline="")
    trace = Trace()
    seen_meta = False
    terminated = False  # whether the previous line ended with a newline (so lines carry them)

    def bad(lineno: int, why: str) -> None:
        msg = f"{source}:{lineno}: {why}" if lineno else f"{source}: {why}"
        if errors is None:
            raise TraceError(msg)
        errors.append(msg)

    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, (bytes, bytearray)):
            data = bytes(raw)
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(lineno, f"not valid UTF-8 (byte {e.start + 1} of the line)")
                terminated = data.endswith(b"\n")
                continue
        torn = terminated and not raw.endswith(("\n", "\r"))
        terminated = raw.endswith(("\n", "\r"))
        line = raw.lstrip("\ufeff").strip() if lineno == 1 else raw.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if torn:
                continue  # an interrupted write: the trace just ends before this line
            bad(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            bad(lineno, "invalid JSON (nested too deeply)")
            continue
        if not isinstance(rec, dict):
            bad(lineno, f"expected a JSON object, got {type(rec).__name__}")
            continue
        kind = rec.get("type")
        if not seen_meta:
            seen_meta = True
            if kind == "meta":
                schema = rec.get("schema")
                if schema != SCHEMA:
                    bad(lineno, f"unsupported schema {schema!r} (expected {SCHEMA})")
                trace.meta = {k: v for k, v in rec.items() if k not in ("type", "schema")}
                continue
            # Reported once; in lenient mode the records are kept under an empty meta.
            bad(lineno, 'the first record must be {"type":"meta",...}')
        try:
            if kind == "token":
                _add_token(trace, TokenRecord.from_dict(rec), errors is not None)
            elif kind == "segment":
                trace.segments.append(segment_from_record(rec))
            elif kind == "text":
                if not isinstance(rec.get("text"), str):
                    raise TypeError("'text' must be a string")
                trace.source_text = (trace.source_text or "") + rec["text"]
            elif kind == "voice_choice":
                if not isinstance(rec.get("probs"), dict):
                    raise TypeError("'probs' must be an object")
                trace.voice_choices.append({k: v for k, v in rec.items() if k != "type"})
            elif kind == "turn":
                if not isinstance(rec.get("index"), int) or isinstance(rec.get("index"), bool):
                    raise TypeError("'index' must be an integer")
                trace.turns.append({k: v for k, v in rec.items() if k != "type"})
            elif kind == "turn_end":
                opened = [t for t in trace.turns if t.get("index") == rec.get("index")]
                if not opened:
                    raise ValueError(f"no turn {rec.get('index')!r} was opened")
                opened[-1]["end"] = {k: v for k, v in rec.items() if k not in ("type", "index")}
            elif kind == "end":
                trace.finish = {k: v for k, v in rec.items() if k != "type"}
            elif kind == "meta":
                raise ValueError("a second meta record")
            else:
                raise ValueError(f"unknown record type {kind!r}")
        except _Gap as e:
            bad(lineno, str(e))
        except KeyError as e:
            bad(lineno, f"{kind} record: missing field {e.args[0]!r}")
        except (TypeError, ValueError) as e:
            bad(lineno, f"{kind} record: {e}")
    if not seen_meta:
        bad(0, "empty trace: no meta record")
    return trace


class _Gap(Exception):
    """Token records were missing before this one (reported; the token is still kept)."""


def _add_token(trace: Trace, tok: TokenRecord, lenient: bool) -> None:
    """Append ``tok``; its index must be the next one. Leniently, a gap left by skipped lines
    is filled with empty placeholders so ``tokens[i].index == i`` still holds."""
    want = len(trace.tokens)
    if tok.index == want:
        trace.tokens.append(tok)
        return
    if not lenient or tok.index < want:
        raise ValueError(f"token index {tok.index}, expected {want}")
    trace.tokens.extend(TokenRecord(index=i, text="") for i in range(want, tok.index))
    trace.tokens.append(tok)
    raise _Gap(f"token records {want}..{tok.index - 1} are missing (kept as empty tokens)")


def load_trace(path: str | Path, errors: list[str] | None = None) -> Trace:
    """Load a trace JSONL file (streaming, line by line); see :func:`parse_trace_lines`."""
    p = Path(path)
    try:
        fh = open(p, "rb")
    except FileNotFoundError:
        raise TraceError(f"{p}: file not found") from None
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror}") from None
    with fh:
        try:
            # Binary lines, decoded one by one, so a bad byte is reported with its line.
            return parse_trace_lines(fh, str(p), errors)
        except OSError as e:
            raise TraceError(f"{p}: cannot read: {e.strerror}") from None


class TraceWriter:
    """Appends a trace to JSONL while it streams; a crash leaves every flushed token on disk."""

    def __init__(self, path: str | Path, meta: dict[str, Any], flush_every: int = 16) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")
        self._flush_every = max(1, flush_every)
        self._since = 0
        self._parts: _AltParts = {}  # token_line's cache of alternatives' fixed text
        self._write(_meta_record(meta))
        self._fh.flush()

    def _write(self, rec: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(_dumps(rec) + "\n")

    def token(self, tok: TokenRecord) -> None:
        """Append one token record."""
        if self._fh is not None:
            self._fh.write(token_line(tok, self._parts) + "\n")
        self._since += 1
        if self._since >= self._flush_every and self._fh is not None:
            self._fh.flush()
            self._since = 0

    def record(self, rec: dict[str, Any]) -> None:
        """Append any other record (e.g. a voice choice)."""
        self._write(rec)

    def segment(self, seg: Segment) -> None:
        """Append one closed segment."""
        self._write(segment_to_record(seg))

    def end(self, finish: dict[str, Any]) -> None:
        """Append the end record and close the file."""
        self._write(_end_record(finish))
        self.close()

    def __enter__(self) -> TraceWriter:
        """Use as a context manager: the file is closed (not ended) on leaving."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the file; without :meth:`end` the trace loads as interrupted."""
        self.close()

    def close(self) -> None:
        """Flush and close (an unfinished trace loads as interrupted)."""
        if self._fh is not None:
            self._fh.flush()
            try:
                os.fsync(self._fh.fileno())
            except OSError:
                pass
            self._fh.close()
            self._fh = None
