"""Dataset record formats (``messages``, ShareGPT, transcripts) normalised to ``messages``, with
the checks every example must pass and structured voices rendered to markers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..parse import Segment, parse_text
from ..voices import VoiceSet, is_valid_name

Severity = Literal["error", "warning"]
Format = Literal["jsonl", "transcript"]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    # Common ShareGPT variants spell the roles the OpenAI way.
    "user": "user",
    "assistant": "assistant",
}
TRANSCRIPT_SUFFIXES = (".txt", ".md")

# Chat-template control tokens: inside content they would forge turns once a template is applied.
SPECIAL_TOKEN_RE = re.compile(
    r"<\|[A-Za-z0-9_]{1,40}\|>"
    r"|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<(?:bos|eos|pad|unk)>",
)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

# Problem codes (stable; convert counts skipped lines by them).
BAD_JSON = "invalid-json"
BAD_UTF8 = "invalid-utf8"
TOO_LONG = "line-too-long"
TOO_DEEP = "nesting-too-deep"
TOP_ARRAY = "top-level-array"
NOT_OBJECT = "not-an-object"
NO_MESSAGES = "no-messages"
WRONG_TYPE = "wrong-type"
UNKNOWN_ROLE = "unknown-role"
UNKNOWN_VOICE = "unknown-voice"
BAD_VOICES = "bad-voices"
UNCLOSED = "unclosed-marker"
EMPTY_REPLY = "empty-reply"
NO_REPLY = "no-reply"
SPECIAL_TOKEN = "special-token"
SURROGATE = "lone-surrogate"
BOM_WARN = "bom"
CRLF_WARN = "crlf"
BLANK_WARN = "blank-line"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an example; ``offset`` points into the reply text when known."""

    code: str
    reason: str
    severity: Severity = "error"
    offset: int | None = None


@dataclass
class Record:
    """An example normalised to ``messages``, the parsed segments of each reply, and problems."""

    messages: list[dict[str, str]] = field(default_factory=list)
    replies: list[list[Segment]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem is an error."""
        return not any(p.severity == "error" for p in self.problems)

    def to_json_obj(self) -> dict[str, Any]:
        """The normalised form written by ``convert``."""
        return {"messages": self.messages}


def detect_format(path: str | Path) -> Format:
    """``transcript`` for .txt/.md files, else ``jsonl``."""
    return "transcript" if Path(path).suffix.lower() in TRANSCRIPT_SUFFIXES else "jsonl"


def _type_name(x: Any) -> str:
    if x is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(x), type(x).__name__)


def _lenient(voices: VoiceSet) -> VoiceSet:
    """The same set, but unknown well-formed names become voices (so we can see them)."""
    return voices if voices.unknown == "lenient" else replace(voices, unknown="lenient")


def render_voices(parts: Sequence[tuple[str, str]], voices: VoiceSet) -> str:
    """Render (voice, text) parts to marked-up text: ``[Name]\\ntext`` or ``<name>text</name>``.

    Parts are separated by a blank line; text of the default voice is written bare, after closing
    a bracket voice (``[/Name]``) that would otherwise swallow it.
    """
    out: list[str] = []
    open_bracket = ""
    for name, text in parts:
        body = text.strip()
        if name.casefold() == voices.default_voice.casefold():
            if open_bracket:
                out.append(f"[/{open_bracket}]\n")
                open_bracket = ""
            out.append(f"{body}\n\n")
            continue
        v = voices.voice(name)
        if v.syntax == "tag":
            out.append(f"{v.open_marker}{body}{v.close_marker}\n\n")
            open_bracket = ""
        else:
            out.append(f"{v.open_marker}\n{body}\n\n")
            open_bracket = v.name
    return "".join(out).rstrip()


def check_reply(
    content: str, voices: VoiceSet, strict: bool, where: str
) -> tuple[list[Segment], list[Problem]]:
    """Parse one assistant reply and report empty text, unknown voices and unclosed markers."""
    problems: list[Problem] = []
    if not content.strip():
        return [], [Problem(EMPTY_REPLY, f"{where}: empty assistant reply")]
    segs = parse_text(content, voices)
    if strict:
        seen = parse_text(content, _lenient(voices)) if voices.unknown != "lenient" else segs
        reported: set[str] = set()
        for s in seen:
            if s.voice == voices.default_voice or voices.get(s.voice) is not None:
                continue
            if s.voice.casefold() not in reported:
                reported.add(s.voice.casefold())
                problems.append(
                    Problem(
                        UNKNOWN_VOICE,
                        f"{where}: unknown voice {s.marker or s.voice!r} (not in voice set "
                        f"{voices.name!r})",
                        offset=s.start - len(s.marker),
                    )
                )
    for s in segs:
        v = voices.get(s.voice)
        if v is not None and v.syntax == "tag" and s.marker and not s.close_marker:
            problems.append(
                Problem(
                    UNCLOSED,
                    f"{where}: unclosed {s.marker} (never closed with {v.close_marker})",
                    offset=s.start - len(s.marker),
                )
            )
    if not any(s.text for s in segs):
        problems.append(Problem(EMPTY_REPLY, f"{where}: assistant reply has markers but no text"))
    return segs, problems


def check_text(content: str, where: str) -> list[Problem]:
    """Report chat-template special tokens and lone surrogates in any message text."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for m in SPECIAL_TOKEN_RE.finditer(content):
        tok = m.group(0)
        if tok in seen:
            continue
        seen.add(tok)
        problems.append(
            Problem(
                SPECIAL_TOKEN,
                f"{where}: chat-template special token {tok!r} in content",
                offset=m.start(),
            )
        )
    sur = _SURROGATE_RE.search(content)
    if sur is not None:
        problems.append(
            Problem(
                SURROGATE,
                f"{where}: lone surrogate \\u{ord(sur.group(0)):04x} in content (not valid UTF-8)",
                offset=sur.start(),
            )
        )
    return problems


def _content(msg: dict[str, Any], key: str, where: str) -> tuple[str | None, Problem | None]:
    """A message's text: a string, or OpenAI-style text parts joined."""
    c = msg.get(key)
    if isinstance(c, str):
        return c, None
    if c is None:
        return None, None
    if isinstance(c, list):
        texts: list[str] = []
        for i, part in enumerate(c):
            if (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                return None, Problem(
                    WRONG_TYPE,
                    f"{where}.{key}[{i}]: only text parts ({{'type': 'text', 'text': ...}}) "
                    "are supported",
                )
        return "".join(texts), None
    return None, Problem(WRONG_TYPE, f"{where}.{key}: must be a string, got {_type_name(c)}")


def _structured(
    raw: Any, voices: VoiceSet, strict: bool, where: str
) -> tuple[str | None, list[Problem]]:
    """Render an assistant message's ``voices`` list to markers, checking it parses back."""
    if not isinstance(raw, list):
        return None, [
            Problem(WRONG_TYPE, f"{where}.voices: must be an array, got {_type_name(raw)}")
        ]
    parts: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        w = f"{where}.voices[{i}]"
        if not isinstance(item, dict):
            return None, [
                Problem(
                    WRONG_TYPE,
                    f"{w}: must be an object with voice and text, got {_type_name(item)}",
                )
            ]
        name, text = item.get("voice"), item.get("text")
        if not isinstance(name, str):
            return None, [
                Problem(WRONG_TYPE, f"{w}.voice: must be a string, got {_type_name(name)}")
            ]
        if not isinstance(text, str):
            return None, [
                Problem(WRONG_TYPE, f"{w}.text: must be a string, got {_type_name(text)}")
            ]
        is_main = name.casefold() == voices.default_voice.casefold()
        declared = voices.get(name)
        if declared is None and not is_main:
            if strict:
                return None, [
                    Problem(
                        UNKNOWN_VOICE,
                        f"{w}.voice: unknown voice {name!r} (not in voice set {voices.name!r})",
                    )
                ]
            if not is_valid_name(name):
                return None, [
                    Problem(
                        BAD_VOICES,
                        f"{w}.voice: {name[:40]!r} is not a valid voice name (1-32 characters, "
                        "a letter first, then letters, digits, space, _ or -)",
                    )
                ]
        if not text.strip():
            return None, [Problem(EMPTY_REPLY, f"{w}.text: empty voice text")]
        canonical = voices.default_voice if is_main else (declared.name if declared else name)
        parts.append((canonical, text.strip()))
    if not parts:
        return None, [Problem(EMPTY_REPLY, f"{where}.voices: empty list (empty assistant reply)")]
    rendered = render_voices(parts, voices)
    back = [(s.voice, s.text) for s in parse_text(rendered, _lenient(voices)) if s.text]
    if back != parts:
        k = next(
            (i for i, (a, b) in enumerate(zip(back, parts, strict=False)) if a != b), len(back)
        )
        k = min(k, len(parts) - 1)
        return None, [
            Problem(
                BAD_VOICES,
                f"{where}.voices[{k}].text: contains voice markers, so it would not parse back as "
                f"voice {parts[k][0]!r}",
            )
        ]
    return rendered, []


def normalize_record(obj: Any, voices: VoiceSet, strict: bool = False) -> Record:
    """Check one decoded JSONL value and normalise it to ``{"messages": [...]}``."""
    rec = Record()
    if isinstance(obj, list):
        rec.problems.append(
            Problem(
                TOP_ARRAY,
                "top-level array instead of an object (JSONL needs one JSON object per line)",
            )
        )
        return rec
    if not isinstance(obj, dict):
        rec.problems.append(Problem(NOT_OBJECT, f"expected a JSON object, got {_type_name(obj)}"))
        return rec
    if "messages" in obj:
        key, role_key, text_key, role_map = "messages", "role", "content", {r: r for r in ROLES}
        expected = "system, user or assistant"
    elif "conversations" in obj:
        key, role_key, text_key, role_map = "conversations", "from", "value", SHAREGPT_ROLES
        expected = "human, gpt or system"
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        rec.problems.append(
            Problem(NO_MESSAGES, f"no 'messages' or 'conversations' list (keys: {keys})")
        )
        return rec
    msgs = obj[key]
    if not isinstance(msgs, list):
        rec.problems.append(Problem(WRONG_TYPE, f"{key}: must be an array, got {_type_name(msgs)}"))
        return rec
    if not msgs:
        rec.problems.append(Problem(NO_MESSAGES, f"{key}: empty array"))
        return rec
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            rec.problems.append(
                Problem(WRONG_TYPE, f"{where}: must be an object, got {_type_name(m)}")
            )
            continue
        raw_role = m.get(role_key)
        if not isinstance(raw_role, str):
            rec.problems.append(
                Problem(
                    WRONG_TYPE, f"{where}.{role_key}: must be a string, got {_type_name(raw_role)}"
                )
            )
            continue
        role = role_map.get(raw_role)
        if role is None:
            rec.problems.append(
                Problem(
                    UNKNOWN_ROLE,
                    f"{where}.{role_key}: unknown role {raw_role[:40]!r} (expected {expected})",
                )
            )
            continue
        content, prob = _content(m, text_key, where)
        if prob is not None:
            rec.problems.append(prob)
            continue
        if "voices" in m:
            if role != "assistant":
                rec.problems.append(
                    Problem(BAD_VOICES, f"{where}.voices: only assistant messages may have voices")
                )
                continue
            if content:
                rec.problems.append(
                    Problem(
                        BAD_VOICES,
                        f"{where}: has both {text_key!r} and 'voices'; give one of them",
                    )
                )
                continue
            content, probs = _structured(m["voices"], voices, strict, where)
            if content is None:
                rec.problems.extend(probs)
                continue
        if content is None:
            got = "missing" if text_key not in m else "must be a string, got null"
            rec.problems.append(Problem(WRONG_TYPE, f"{where}.{text_key}: {got}"))
            continue
        rec.problems.extend(check_text(content, where))
        if role == "assistant":
            segs, probs = check_reply(content, voices, strict, where)
            rec.problems.extend(probs)
            rec.replies.append(segs)
        rec.messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in rec.messages) and rec.ok:
        rec.problems.append(Problem(NO_REPLY, f"{key}: no assistant reply"))
    return rec


def transcript_record(text: str, voices: VoiceSet, strict: bool = False) -> Record:
    """A plain transcript: the whole text is one assistant reply in voices."""
    rec = Record()
    rec.problems.extend(check_text(text, "reply"))
    segs, probs = check_reply(text, voices, strict, "reply")
    rec.problems.extend(probs)
    rec.replies.append(segs)
    rec.messages.append({"role": "assistant", "content": text})
    return rec
