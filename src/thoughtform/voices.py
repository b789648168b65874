"""Voice sets: the named inner voices a model speaks in, their markers, colours and presets."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

Syntax = Literal["bracket", "tag"]
UnknownPolicy = Literal["lenient", "strict"]

DEFAULT_VOICE = "main"
MAX_NAME_LEN = 32

# Eight colours, each with >= 3:1 contrast on white and on #111111 (readable in light and dark
# themes), and every pair, and each against the grey of ``main``, >= 14 CIELAB units apart under
# normal vision and simulated deuteranopia and protanopia (Machado 2009). tests/test_voices.py
# holds them to >= 12. Order follows the seed voices; hues stay close to the first palette.
PALETTE: tuple[str, ...] = (
    "#BB5500",
    "#3366DD",
    "#669933",
    "#885588",
    "#0099CC",
    "#CC0044",
    "#EE22AA",
    "#DD11FF",
)
MAIN_COLOR = "#777777"

# Used with fullmatch: "$" alone would also accept a trailing newline.
_HEX = re.compile(r"#[0-9A-Fa-f]{6}")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


class VoiceSetError(ValueError):
    """A voice-set file or mapping is invalid; the message names the file, field and problem."""


def is_name_char(ch: str) -> bool:
    """Whether ``ch`` may continue a bracket voice name (letters, marks, digits, space, _ or -)."""
    if ch in " _-":
        return True
    if ch.isalnum():
        return True
    return unicodedata.category(ch)[0] == "M"


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a well-formed bracket name: 1-32 chars, a letter first, no trailing space."""
    if not 1 <= len(name) <= MAX_NAME_LEN or not name[0].isalpha() or name[-1] == " ":
        return False
    return all(is_name_char(c) for c in name[1:])


def auto_color(name: str, taken: Iterable[str] = ()) -> str:
    """A palette colour for an undeclared voice: stable per name, avoiding colours already taken."""
    used = {c.upper() for c in taken}
    digest = int(hashlib.sha1(name.casefold().encode("utf-8", "surrogatepass")).hexdigest(), 16)
    start = digest % len(PALETTE)
    for k in range(len(PALETTE)):
        cand = PALETTE[(start + k) % len(PALETTE)]
        if cand.upper() not in used:
            return cand
    return PALETTE[start]


@dataclass(frozen=True)
class Voice:
    """One voice: its name, aliases, look, lane and the sentence that describes it to a model."""

    name: str
    aliases: tuple[str, ...] = ()
    color: str = ""
    glyph: str = ""
    lane: int = 0
    description: str = ""
    syntax: Syntax = "bracket"
    temperature: float | None = None
    top_p: float | None = None
    vector: float | None = None  # strength of this voice's steering vector (thoughtform.vectors)
    # Where this voice speaks in a council (thoughtform.council): its own backend, model, server
    # and LoRA adapter, named as ChatSettings names them; None: the council's shared backend.
    backend: str | None = None
    model: str | None = None
    base_url: str | None = None
    adapter: str | None = None

    @property
    def open_marker(self) -> str:
        """The marker that opens this voice."""
        return f"<{self.name}>" if self.syntax == "tag" else f"[{self.name}]"

    @property
    def close_marker(self) -> str:
        """The marker that closes this voice."""
        return f"</{self.name}>" if self.syntax == "tag" else f"[/{self.name}]"

    def to_dict(self) -> dict[str, Any]:
        """This voice as a plain mapping (the YAML/JSON form)."""
        out: dict[str, Any] = {"name": self.name}
        if self.aliases:
            out["aliases"] = list(self.aliases)
        out["color"] = self.color
        if self.glyph:
            out["glyph"] = self.glyph
        out["lane"] = self.lane
        out["description"] = self.description
        if self.syntax != "bracket":
            out["syntax"] = self.syntax
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.vector is not None:
            out["vector"] = self.vector
        out.update(self.binding)
        return out

    @property
    def bound(self) -> bool:
        """Whether this voice names a backend of its own (``backend:``)."""
        return self.backend is not None

    @property
    def binding(self) -> dict[str, str]:
        """This voice's own backend fields that are set (what an editor keeps for it)."""
        return {k: v for k in BINDING_KEYS if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class VoiceSet:
    """A set of voices, how their markers look, and what happens to unknown names."""

    name: str
    voices: tuple[Voice, ...] = ()
    unknown: UnknownPolicy = "lenient"
    default_voice: str = DEFAULT_VOICE
    description: str = ""
    _index: dict[str, Voice] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, Voice] = {}
        for v in self.voices:
            for key in (v.name, *v.aliases):
                index.setdefault(key.casefold(), v)
        object.__setattr__(self, "_index", index)

    def get(self, name: str) -> Voice | None:
        """The declared voice called ``name`` (or with that alias), case-insensitively."""
        return self._index.get(name.casefold())

    def names(self) -> list[str]:
        """Declared voice names in lane order."""
        return [v.name for v in sorted(self.voices, key=lambda v: v.lane)]

    @property
    def bracket_voices(self) -> tuple[Voice, ...]:
        """Voices written as ``[Name]``."""
        return tuple(v for v in self.voices if v.syntax == "bracket")

    @property
    def tag_voices(self) -> tuple[Voice, ...]:
        """Voices written as ``<name>…</name>``."""
        return tuple(v for v in self.voices if v.syntax == "tag")

    def color_of(self, name: str) -> str:
        """The colour of voice ``name``: declared, the neutral main colour, or auto-assigned."""
        if name == self.default_voice:
            return MAIN_COLOR
        v = self.get(name)
        if v is not None and v.color:
            return v.color
        return auto_color(name, (x.color for x in self.voices))

    def voice(self, name: str) -> Voice:
        """The declared voice, or a synthesised one for ``main`` and unknown names."""
        v = self.get(name)
        if v is not None:
            return v
        lane = 0 if name == self.default_voice else len(self.voices) + 1
        return Voice(name=name, color=self.color_of(name), lane=lane)

    def with_voices(self, voices: Iterable[Voice]) -> VoiceSet:
        """A copy with a different list of voices."""
        return replace(self, voices=tuple(voices))

    def to_dict(self) -> dict[str, Any]:
        """This set as a plain mapping (the YAML/JSON form)."""
        return {
            "name": self.name,
            "description": self.description,
            "unknown": self.unknown,
            "default_voice": self.default_voice,
            "voices": [v.to_dict() for v in self.voices],
        }

    def to_yaml(self) -> str:
        """This set as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _seed() -> VoiceSet:
    spec = [
        ("Echo", "◎", "repeats and reflects what was just said, turning it slightly"),
        ("Resonance", "≈", "connects the moment to something larger and lets it ring"),
        ("Inner", "●", "speaks privately, the quiet thought not meant for anyone else"),
        ("Thread", "⟿", "keeps the line of thought and says where it is going"),
        ("Role", "◆", "speaks as the persona the conversation calls for"),
        ("Pulse", "♥", "is short and bodily: a sensation, a heartbeat, one breath"),
        ("Doubt", "?", "questions the claim just made and asks what is missing"),
        ("Shift", "↻", "turns the frame and looks at the matter from elsewhere"),
    ]
    voices = tuple(
        Voice(name=n, color=PALETTE[i], glyph=g, lane=i + 1, description=f"{n} {d}.")
        for i, (n, g, d) in enumerate(spec)
    )
    return VoiceSet(
        name="seed",
        voices=voices,
        unknown="lenient",
        description="The eight inner voices from the conversation thoughtform came from.",
    )


def _think() -> VoiceSet:
    return VoiceSet(
        name="think",
        voices=(
            Voice(
                name="think",
                color=PALETTE[1],
                glyph="…",
                lane=1,
                description="think reasons step by step before the answer.",
                syntax="tag",
            ),
        ),
        unknown="strict",
        description="Reasoning models: <think>…</think> before the answer.",
    )


def _plain() -> VoiceSet:
    return VoiceSet(name="plain", voices=(), unknown="strict", description="No voices.")


PRESETS: Mapping[str, VoiceSet] = {"seed": _seed(), "think": _think(), "plain": _plain()}


def _err(src: str, fld: str, problem: str) -> VoiceSetError:
    return VoiceSetError(f"{src}: {fld}: {problem}")


def _opt_float(src: str, fld: str, value: Any, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(src, fld, f"must be a number, got {type(value).__name__}")
    if not lo <= float(value) <= hi:
        raise _err(src, fld, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def _str(src: str, fld: str, value: Any, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise _err(src, fld, f"must be a string, got {type(value).__name__}")
    return value


_VOICE_KEYS = {
    "name",
    "aliases",
    "color",
    "glyph",
    "lane",
    "description",
    "syntax",
    "temperature",
    "top_p",
    "vector",
    "backend",
    "model",
    "base_url",
    "adapter",
}
# A voice's own model binding (see Voice); the backends it may name are the built-in ones.
BINDING_KEYS = ("backend", "model", "base_url", "adapter")
BINDING_BACKENDS = ("llamacpp", "openai", "transformers", "replay")
# Voice-vector strengths: 1 shifts the residual stream by about one voice contrast, and past
# a few the text stops being language; the workbench's sliders span -2..2.
VECTOR_MIN, VECTOR_MAX = -4.0, 4.0
_SET_KEYS = {"name", "description", "unknown", "default_voice", "voices", "syntax"}


def _binding(src: str, where: str, rv: Mapping[str, Any]) -> dict[str, str | None]:
    """A voice's ``backend`` / ``model`` / ``base_url`` / ``adapter``, checked for form only:
    files and servers are checked when a council opens the backend (a set stays loadable on a
    machine without them)."""
    out: dict[str, str | None] = {}
    for key in BINDING_KEYS:
        value = _str(src, f"{where}.{key}", rv.get(key)).strip()
        out[key] = value or None
    backend = out["backend"]
    if backend is None:
        for key in BINDING_KEYS[1:]:
            if out[key] is not None:
                raise _err(
                    src,
                    f"{where}.{key}",
                    "needs backend: (one of " + ", ".join(BINDING_BACKENDS) + ")",
                )
        return out
    if backend not in BINDING_BACKENDS:
        raise _err(
            src,
            f"{where}.backend",
            f"must be one of {', '.join(BINDING_BACKENDS)}, got {backend[:40]!r}",
        )
    if out["base_url"] is not None:
        if backend != "openai":
            raise _err(
                src, f"{where}.base_url", f"only the openai backend takes a base_url, not {backend}"
            )
        if not re.fullmatch(r"https?://\S+", out["base_url"] or ""):
            raise _err(
                src, f"{where}.base_url", f"must be an http(s) URL, got {out['base_url'][:60]!r}"
            )
    if out["adapter"] is not None and backend != "llamacpp":
        raise _err(
            src,
            f"{where}.adapter",
            f"only the llamacpp backend takes a LoRA adapter, not {backend}",
        )
    if backend == "replay" and out["model"] is None:
        raise _err(
            src, f"{where}.model", "the replay backend needs the recording to play (model: PATH)"
        )
    return out


def voice_set_from_dict(data: Any, source: str = "<voices>") -> VoiceSet:
    """Build and validate a voice set from a mapping; errors name ``source``, the field and problem."""
    if not isinstance(data, dict):
        raise _err(source, "(top level)", "must be a mapping with a 'voices' list")
    extra = set(data) - _SET_KEYS
    if extra:
        raise _err(source, sorted(map(str, extra))[0], "unknown field")
    unknown = data.get("unknown", "lenient")
    if unknown not in ("lenient", "strict"):
        raise _err(source, "unknown", f"must be 'lenient' or 'strict', got {unknown!r}")
    default_syntax = data.get("syntax", "bracket")
    if default_syntax not in ("bracket", "tag"):
        raise _err(source, "syntax", f"must be 'bracket' or 'tag', got {default_syntax!r}")
    raw_voices = data.get("voices", [])
    if raw_voices is None:
        raw_voices = []
    if not isinstance(raw_voices, list):
        raise _err(source, "voices", "must be a list")
    voices: list[Voice] = []
    seen: dict[str, str] = {}
    for i, rv in enumerate(raw_voices):
        where = f"voices[{i}]"
        if isinstance(rv, str):
            rv = {"name": rv}
        if not isinstance(rv, dict):
            raise _err(source, where, "must be a mapping or a name")
        extra = set(rv) - _VOICE_KEYS
        if extra:
            raise _err(source, f"{where}.{sorted(map(str, extra))[0]}", "unknown field")
        name = rv.get("name")
        if not isinstance(name, str) or not name:
            raise _err(source, f"{where}.name", "is required and must be a non-empty string")
        syntax = rv.get("syntax", default_syntax)
        if syntax not in ("bracket", "tag"):
            raise _err(source, f"{where}.syntax", f"must be 'bracket' or 'tag', got {syntax!r}")
        valid = _TAG_NAME.fullmatch if syntax == "tag" else is_valid_name
        if not valid(name):
            raise _err(
                source,
                f"{where}.name",
                f"{name[:40]!r} is not a valid {syntax} name (1-32 chars, starts with a letter"
                + (", then letters, digits, space, _ or -)" if syntax == "bracket" else ")"),
            )
        aliases_raw = rv.get("aliases", []) or []
        if not isinstance(aliases_raw, list) or not all(isinstance(a, str) for a in aliases_raw):
            raise _err(source, f"{where}.aliases", "must be a list of strings")
        for j, a in enumerate(aliases_raw):
            if not valid(a):
                raise _err(source, f"{where}.aliases[{j}]", f"{a[:40]!r} is not a valid name")
        for pos, key in enumerate((name, *aliases_raw)):
            k = key.casefold()
            if k in seen:
                fld = f"{where}.name" if pos == 0 else f"{where}.aliases[{pos - 1}]"
                raise _err(source, fld, f"{key!r} is already used by {seen[k]!r}")
            seen[k] = name
        color = _str(source, f"{where}.color", rv.get("color"))
        if color and not _HEX.fullmatch(color):
            raise _err(
                source, f"{where}.color", f"must be a hex colour like '#3366DD', got {color!r}"
            )
        lane = rv.get("lane", i + 1)
        if isinstance(lane, bool) or not isinstance(lane, int):
            raise _err(source, f"{where}.lane", "must be an integer")
        glyph = _str(source, f"{where}.glyph", rv.get("glyph"))
        if len(glyph) > 4:
            raise _err(source, f"{where}.glyph", "must be at most 4 characters")
        voices.append(
            Voice(
                name=name,
                aliases=tuple(aliases_raw),
                color=color.upper() if color else "",
                glyph=glyph,
                lane=lane,
                description=_str(source, f"{where}.description", rv.get("description")),
                syntax=syntax,
                temperature=_opt_float(source, f"{where}.temperature", rv.get("temperature"), 0, 5),
                top_p=_opt_float(source, f"{where}.top_p", rv.get("top_p"), 0, 1),
                vector=_opt_float(
                    source, f"{where}.vector", rv.get("vector"), VECTOR_MIN, VECTOR_MAX
                ),
                **_binding(source, where, rv),
            )
        )
    # Fill in missing colours from the palette, skipping those already declared.
    taken = [v.color for v in voices if v.color]
    filled = []
    for v in voices:
        if not v.color:
            c = auto_color(v.name, taken)
            taken.append(c)
            v = replace(v, color=c)
        filled.append(v)
    default_voice = _str(source, "default_voice", data.get("default_voice"), DEFAULT_VOICE)
    if not default_voice:
        raise _err(source, "default_voice", "must not be empty")
    return VoiceSet(
        name=_str(source, "name", data.get("name"), Path(source).stem),
        voices=tuple(filled),
        unknown=unknown,
        default_voice=default_voice,
        description=_str(source, "description", data.get("description")),
    )


def load_voice_set(path: str | Path) -> VoiceSet:
    """Load a voice set from a YAML (or JSON) file; raise VoiceSetError naming file and field."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise VoiceSetError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise VoiceSetError(f"{p}: is a directory, expected a YAML file") from None
    except OSError as e:
        raise VoiceSetError(f"{p}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise VoiceSetError(f"{p}: byte {e.start}: not valid UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VoiceSetError(f"{p}: {line}invalid YAML: {problem}") from None
    try:
        return voice_set_from_dict(data, str(p))
    except VoiceSetError as e:
        # The field's line in the file, so an editor can jump to it: "(line N)" at the end.
        head = f"{p}: "
        msg = str(e)
        fld = msg[len(head) :].split(": ", 1)[0] if msg.startswith(head) else ""
        at = _field_line(text, fld)
        if at is None:
            raise
        raise VoiceSetError(f"{msg} (line {at})") from None


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _field_line(text: str, fld: str) -> int | None:
    """The 1-based line of field ``fld`` (``voices[1].backend``) in YAML ``text``: the deepest
    part of the path that is there (None when the text has no mapping at the top)."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    line = None
    for key, index in _PATH_PART.findall(fld):
        if index and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            node = node.value[int(index)]
        elif key and isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if getattr(k, "value", None) == key]
            if not hit:
                break
            line = hit[0][0].start_mark.line + 1
            node = hit[0][1]
            continue
        else:
            break
        line = node.start_mark.line + 1
    return line


def resolve_voice_set(spec: str | Path | VoiceSet | None) -> VoiceSet:
    """A voice set from a preset name, a file path, or an existing set (None means ``seed``)."""
    if isinstance(spec, VoiceSet):
        return spec
    if spec is None:
        return PRESETS["seed"]
    s = str(spec)
    if s in PRESETS:
        return PRESETS[s]
    p = Path(s)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.exists():
        return load_voice_set(p)
    raise VoiceSetError(
        f"{s}: unknown voice preset (presets: {', '.join(PRESETS)}; or give a .yaml file path)"
    )


STARTER_YAML = """\
# thoughtform voice set. Load it with --voices PATH.
# Schema for editors: `thoughtform voices schema > voices.schema.json`.
name: my-voices
description: Inner voices for my fine-tuned model.
# lenient: an unknown but well-formed [Name] at the start of a line starts a new voice
#          (it gets a colour of its own); strict: unknown names stay plain text.
unknown: lenient
# Text outside any voice belongs to this voice.
default_voice: main
voices:
  - name: Echo                 # written as [Echo] at the start of a line; [/Echo] closes it
    aliases: [echo-voice]      # other spellings that mean the same voice
    color: "#BB5500"           # hex; leave out to get one from the colour-blind-safe palette
    glyph: "◎"                 # optional, up to 4 characters, shown in labels
    lane: 1                    # order of lanes on the timeline
    description: Echo repeats and reflects what was just said.   # used to prompt models
  - name: Doubt
    description: Doubt questions the claim just made.
    temperature: 0.9           # optional sampling overrides used when steering to this voice
    top_p: 0.95
    vector: 0.8                # optional strength of Doubt's voice vector (-4..4; 0 is off)
    # optional: where Doubt speaks in a council (default: the council's shared model)
    # backend: openai          # llamacpp | openai | transformers | replay
    # model: my-model          # a .gguf path, a model directory, the server's model, a recording
    # base_url: http://127.0.0.1:8080/v1   # openai only
    # adapter: doubt-lora.gguf # llamacpp only: a LoRA adapter (GGUF)
  - name: think
    syntax: tag                # written as <think>…</think>, anywhere in a line
    description: think reasons step by step before the answer.
"""


def json_schema() -> dict[str, Any]:
    """A JSON Schema for voice-set files, for editors that validate YAML."""
    name = {"type": "string", "minLength": 1, "maxLength": 32}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "thoughtform voice set",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "unknown": {"enum": ["lenient", "strict"]},
            "default_voice": {"type": "string", "minLength": 1},
            "syntax": {"enum": ["bracket", "tag"]},
            "voices": {
                "type": "array",
                "items": {
                    "anyOf": [
                        name,
                        {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": name,
                                "aliases": {"type": "array", "items": name},
                                "color": {"type": "string", "pattern": "^#[0-9A-Fa-f]{6}$"},
                                "glyph": {"type": "string", "maxLength": 4},
                                "lane": {"type": "integer"},
                                "description": {"type": "string"},
                                "syntax": {"enum": ["bracket", "tag"]},
                                "temperature": {"type": "number", "minimum": 0, "maximum": 5},
                                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                                "vector": {
                                    "type": "number",
                                    "minimum": VECTOR_MIN,
                                    "maximum": VECTOR_MAX,
                                },
                                "backend": {"enum": list(BINDING_BACKENDS)},
                                "model": {"type": "string"},
                                "base_url": {"type": "string", "pattern": "^https?://"},
                                "adapter": {"type": "string"},
                            },
                        },
                    ]
                },
            },
        },
        "required": ["voices"],
    }


def json_schema_text() -> str:
    """The JSON Schema as indented JSON text."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False)
