"""Voice sets: presets, YAML loading and its error messages, the palette, the JSON schema."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from thoughtform.voices import (
    MAIN_COLOR,
    PALETTE,
    PRESETS,
    STARTER_YAML,
    Voice,
    VoiceSet,
    VoiceSetError,
    auto_color,
    is_valid_name,
    json_schema,
    json_schema_text,
    load_voice_set,
    resolve_voice_set,
    voice_set_from_dict,
)

# -- presets ----------------------------------------------------------------------------------


def test_seed_preset() -> None:
    seed = PRESETS["seed"]
    assert seed.names() == [
        "Echo",
        "Resonance",
        "Inner",
        "Thread",
        "Role",
        "Pulse",
        "Doubt",
        "Shift",
    ]
    assert [v.color for v in seed.voices] == list(PALETTE)
    assert [v.lane for v in seed.voices] == list(range(1, 9))
    assert seed.unknown == "lenient" and seed.default_voice == "main"
    for v in seed.voices:
        assert v.syntax == "bracket" and v.glyph and v.description.startswith(v.name + " ")
        assert (v.open_marker, v.close_marker) == (f"[{v.name}]", f"[/{v.name}]")


def test_think_and_plain_presets() -> None:
    think = PRESETS["think"]
    (v,) = think.voices
    assert (v.name, v.syntax, think.unknown) == ("think", "tag", "strict")
    assert (v.open_marker, v.close_marker) == ("<think>", "</think>")
    assert think.tag_voices == (v,) and think.bracket_voices == ()
    plain = PRESETS["plain"]
    assert plain.voices == () and plain.unknown == "strict"


def test_lookup_is_case_insensitive_and_colours_are_stable() -> None:
    seed = PRESETS["seed"]
    assert seed.get("ECHO") is seed.get("echo") is seed.voices[0]
    assert seed.get("nobody") is None
    assert seed.color_of("main") == MAIN_COLOR
    assert seed.color_of("doubt") == PALETTE[6]
    # Unknown voices get a palette colour, the same every time and in every process.
    c = seed.color_of("Tangent")
    assert c in PALETTE and c == seed.color_of("tangent") == auto_color("Tangent", PALETTE)
    synth = seed.voice("Tangent")
    assert (synth.name, synth.color, synth.lane) == ("Tangent", c, 9)
    assert seed.voice("main").lane == 0


def test_auto_color_avoids_taken_colours() -> None:
    taken = list(PALETTE[:7])
    assert auto_color("x", taken) == PALETTE[7]
    assert auto_color("x", [c.lower() for c in taken]) == PALETTE[7]
    # When all are taken it still answers with a palette colour.
    assert auto_color("x", PALETTE) in PALETTE
    # Lone surrogates in a name must not crash the hash.
    assert auto_color("\ud800") in PALETTE


def test_resolve_voice_set(tmp_path: Path) -> None:
    assert resolve_voice_set(None) is PRESETS["seed"]
    assert resolve_voice_set("think") is PRESETS["think"]
    vs = PRESETS["plain"]
    assert resolve_voice_set(vs) is vs
    p = tmp_path / "mine.yaml"
    p.write_text(STARTER_YAML, encoding="utf-8")
    assert resolve_voice_set(p).name == "my-voices"
    assert resolve_voice_set(str(p)).name == "my-voices"
    with pytest.raises(
        VoiceSetError, match=r"^nope: unknown voice preset \(presets: seed, think, plain"
    ):
        resolve_voice_set("nope")
    with pytest.raises(VoiceSetError, match="file not found"):
        resolve_voice_set(tmp_path / "missing.yml")


def test_starter_yaml_loads_as_documented(tmp_path: Path) -> None:
    p = tmp_path / "v.yaml"
    p.write_text(STARTER_YAML, encoding="utf-8")
    vs = load_voice_set(p)
    assert [v.name for v in vs.voices] == ["Echo", "Doubt", "think"]
    echo, doubt, think = vs.voices
    assert echo.aliases == ("echo-voice",) and echo.color == "#BB5500" and echo.glyph == "◎"
    assert (doubt.temperature, doubt.top_p, doubt.vector) == (0.9, 0.95, 0.8)
    assert echo.vector is None
    assert doubt.color in PALETTE and doubt.color != echo.color  # filled from the palette
    assert think.syntax == "tag" and think.lane == 3
    assert len({v.color for v in vs.voices}) == 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict_and_yaml(name: str, tmp_path: Path) -> None:
    vs = PRESETS[name]
    assert voice_set_from_dict(vs.to_dict(), name) == vs
    p = tmp_path / f"{name}.yaml"
    p.write_text(vs.to_yaml(), encoding="utf-8")
    assert load_voice_set(p) == vs


def test_names() -> None:
    for good in ("Echo", "Inner Critic", "self-talk_2", "Мысль", "思考", "e\u0301", "A" * 32):
        assert is_valid_name(good), good
    for bad in ("", "1x", " x", "x ", "_x", "x.y", "x]", "x\n", "x\u200d", "A" * 33, "[x"):
        assert not is_valid_name(bad), bad


# -- loading errors name the file, the field and the problem -----------------------------------


def load_text(tmp_path: Path, text: str | bytes, name: str = "v.yaml") -> VoiceSet:
    """Write ``text`` to a file and load it."""
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return load_voice_set(p)


BAD_YAML = [
    (
        "voices:\n  - Echo\n  - Doubt\n  - name: Pulse\n    color: red\n",
        "voices[2].color",
        "must be a hex colour like '#3366DD', got 'red'",
    ),
    (
        "voices:\n  - name: Echo\n    color: '#3366DD\\n'\n",
        "voices[0].color",
        "must be a hex colour",
    ),
    (
        "voices:\n  - color: '#123456'\n",
        "voices[0].name",
        "is required and must be a non-empty string",
    ),
    ("voices:\n  - name: 12\n", "voices[0].name", "is required and must be a non-empty string"),
    ("voices:\n  - name: 1st\n", "voices[0].name", "'1st' is not a valid bracket name"),
    ("voices:\n  - name: 'think>'\n    syntax: tag\n", "voices[0].name", "is not a valid tag name"),
    (
        'voices:\n  - name: "think\\n"\n    syntax: tag\n',
        "voices[0].name",
        "is not a valid tag name",
    ),
    ("voices:\n  - Echo\n  - echo\n", "voices[1].name", "'echo' is already used by 'Echo'"),
    (
        "voices:\n  - Echo\n  - name: Doubt\n    aliases: [x, ECHO]\n",
        "voices[1].aliases[1]",
        "'ECHO' is already used by 'Echo'",
    ),
    (
        "voices:\n  - name: Echo\n    aliases: [ok, '9']\n",
        "voices[0].aliases[1]",
        "'9' is not a valid name",
    ),
    ("voices:\n  - name: Echo\n    aliases: x\n", "voices[0].aliases", "must be a list of strings"),
    ("voices:\n  - name: Echo\n    colour: '#123456'\n", "voices[0].colour", "unknown field"),
    ("voices:\n  - name: Echo\n    lane: first\n", "voices[0].lane", "must be an integer"),
    ("voices:\n  - name: Echo\n    lane: true\n", "voices[0].lane", "must be an integer"),
    (
        "voices:\n  - name: Echo\n    glyph: abcde\n",
        "voices[0].glyph",
        "must be at most 4 characters",
    ),
    (
        "voices:\n  - name: Echo\n    temperature: 9\n",
        "voices[0].temperature",
        "must be between 0 and 5, got 9",
    ),
    (
        "voices:\n  - name: Echo\n    temperature: .nan\n",
        "voices[0].temperature",
        "must be between 0 and 5",
    ),
    ("voices:\n  - name: Echo\n    top_p: high\n", "voices[0].top_p", "must be a number, got str"),
    (
        "voices:\n  - name: Echo\n    vector: 5\n",
        "voices[0].vector",
        "must be between -4.0 and 4.0, got 5",
    ),
    (
        "voices:\n  - name: Echo\n    vector: -.inf\n",
        "voices[0].vector",
        "must be between -4.0 and 4.0",
    ),
    (
        "voices:\n  - name: Echo\n    vector: strong\n",
        "voices[0].vector",
        "must be a number, got str",
    ),
    (
        "voices:\n  - name: Echo\n    vector: true\n",
        "voices[0].vector",
        "must be a number, got bool",
    ),
    (
        "voices:\n  - name: Echo\n    syntax: xml\n",
        "voices[0].syntax",
        "must be 'bracket' or 'tag', got 'xml'",
    ),
    (
        "voices:\n  - name: Echo\n    description: [a]\n",
        "voices[0].description",
        "must be a string, got list",
    ),
    ("voices:\n  - [Echo]\n", "voices[0]", "must be a mapping or a name"),
    ("voices: Echo\n", "voices", "must be a list"),
    ("unknown: maybe\nvoices: []\n", "unknown", "must be 'lenient' or 'strict', got 'maybe'"),
    ("syntax: json\nvoices: []\n", "syntax", "must be 'bracket' or 'tag'"),
    ("default_voice: ''\nvoices: []\n", "default_voice", "must not be empty"),
    ("voicez: []\n", "voicez", "unknown field"),
    ("1: x\nvoices: []\n", "1", "unknown field"),
    ("- Echo\n", "(top level)", "must be a mapping with a 'voices' list"),
    ("", "(top level)", "must be a mapping"),
]


@pytest.mark.parametrize(("text", "field", "problem"), BAD_YAML)
def test_load_errors_name_file_field_and_problem(
    tmp_path: Path, text: str, field: str, problem: str
) -> None:
    with pytest.raises(VoiceSetError) as info:
        load_text(tmp_path, text)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'v.yaml'}: {field}: "), msg
    assert problem in msg, msg


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(
        VoiceSetError, match=r"v\.yaml: line 2: invalid YAML: mapping values are not"
    ):
        load_text(tmp_path, "voices: [Echo]\nname: a: b\n")
    with pytest.raises(VoiceSetError, match=r"v\.yaml: byte 9: not valid UTF-8"):
        load_text(tmp_path, b"voices: [\xff]\n")
    with pytest.raises(VoiceSetError, match=r"missing\.yaml: file not found"):
        load_voice_set(tmp_path / "missing.yaml")
    with pytest.raises(VoiceSetError, match="is a directory"):
        load_voice_set(tmp_path)
    # A BOM is fine, and JSON is YAML.
    assert load_text(tmp_path, "\ufeffvoices: [Echo]\n").voices[0].name == "Echo"
    vs = load_text(tmp_path, json.dumps({"voices": [{"name": "Echo"}]}), "v.json")
    assert vs.name == "v" and vs.voices[0].color in PALETTE


def test_set_level_syntax_default_and_colours(tmp_path: Path) -> None:
    vs = load_text(
        tmp_path, "syntax: tag\nvoices: [think, {name: Echo, syntax: bracket, color: '#aabbcc'}]\n"
    )
    assert [(v.name, v.syntax) for v in vs.voices] == [("think", "tag"), ("Echo", "bracket")]
    assert vs.voices[1].color == "#AABBCC"  # normalised to upper case
    assert vs.voices[0].color in PALETTE and vs.voices[0].color != "#AABBCC"


# -- the palette ------------------------------------------------------------------------------

# Machado, Oliveira & Fernandes (2009), severity 1.0, applied to linear RGB.
PROTANOPIA = np.array(
    [
        [0.152286, 1.052583, -0.204868],
        [0.114503, 0.786281, 0.099216],
        [-0.003882, -0.048116, 1.051998],
    ]
)
DEUTERANOPIA = np.array(
    [
        [0.367322, 0.860646, -0.227968],
        [0.280085, 0.672501, 0.047413],
        [-0.011820, 0.042940, 0.968881],
    ]
)
VISIONS = {"normal": np.eye(3), "deuteranopia": DEUTERANOPIA, "protanopia": PROTANOPIA}
SRGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
D65 = np.array([0.95047, 1.0, 1.08883])


def linear_rgb(hex_color: str) -> np.ndarray:
    """sRGB hex to linear RGB in [0, 1]."""
    c = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def luminance(hex_color: str) -> float:
    """WCAG relative luminance."""
    return float(linear_rgb(hex_color) @ np.array([0.2126, 0.7152, 0.0722]))


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def lab(rgb_linear: np.ndarray) -> np.ndarray:
    """Linear RGB to CIELAB (D65)."""
    xyz = SRGB_TO_XYZ @ rgb_linear / D65
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def seen_as(hex_color: str, vision: str) -> np.ndarray:
    """CIELAB of a colour as seen under one kind of vision."""
    return lab(np.clip(VISIONS[vision] @ linear_rgb(hex_color), 0, 1))


def test_colour_maths_on_known_values() -> None:
    assert contrast("#000000", "#FFFFFF") == pytest.approx(21.0)
    assert contrast("#777777", "#FFFFFF") == pytest.approx(4.48, abs=0.01)
    assert np.allclose(seen_as("#FFFFFF", "normal"), [100, 0, 0], atol=0.01)
    assert np.allclose(seen_as("#FF0000", "normal"), [53.24, 80.09, 67.20], atol=0.05)
    # The simulations move saturated red a lot and leave greys where they are.
    assert np.linalg.norm(seen_as("#FF0000", "protanopia") - seen_as("#FF0000", "normal")) > 40
    for vision in VISIONS:
        assert np.allclose(seen_as("#777777", vision), seen_as("#777777", "normal"), atol=0.5)


def test_palette_is_eight_distinct_hex_colours() -> None:
    assert len(PALETTE) == 8 == len(set(PALETTE))
    for c in (*PALETTE, MAIN_COLOR):
        assert c.startswith("#") and len(c) == 7 and c == c.upper()
        int(c[1:], 16)


@pytest.mark.parametrize("color", [*PALETTE, MAIN_COLOR])
def test_palette_contrast_on_light_and_dark(color: str) -> None:
    assert contrast(color, "#FFFFFF") >= 3.0
    assert contrast(color, "#111111") >= 3.0


@pytest.mark.parametrize("vision", sorted(VISIONS))
def test_palette_pairwise_distance(vision: str) -> None:
    labs = {c: seen_as(c, vision) for c in (*PALETTE, MAIN_COLOR)}
    for a, b in itertools.combinations(PALETTE, 2):
        assert np.linalg.norm(labs[a] - labs[b]) >= 12, (vision, a, b)
    # The neutral main voice stays apart from every voice colour too.
    for a in PALETTE:
        assert np.linalg.norm(labs[a] - labs[MAIN_COLOR]) >= 12, (vision, a)


# -- JSON schema ------------------------------------------------------------------------------


def test_schema_is_valid_and_accepts_starter_and_presets() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert json.loads(json_schema_text()) == schema
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(yaml.safe_load(STARTER_YAML))
    for vs in PRESETS.values():
        validator.validate(vs.to_dict())


@pytest.mark.parametrize(
    "doc",
    [
        {"voices": [{"name": "Echo", "color": "red"}]},
        {"voices": [{"name": "Echo", "colour": "#123456"}]},
        {"voices": [{"name": "Echo", "temperature": 9}]},
        {"voices": [{"name": "Echo", "vector": -4.5}]},
        {"voices": [{"name": "Echo", "vector": "1"}]},
        {"voices": [{"name": ""}]},
        {"voices": [{"name": "x" * 33}]},
        {"voices": [{"name": "Echo", "syntax": "xml"}]},
        {"voices": [{"color": "#123456"}]},
        {"voices": [], "unknown": "maybe"},
        {"voicez": []},
    ],
)
def test_schema_rejects_what_the_loader_rejects(doc: dict[str, object]) -> None:
    assert not jsonschema.Draft202012Validator(json_schema()).is_valid(doc)
    with pytest.raises(VoiceSetError):
        voice_set_from_dict(doc)


def test_voice_dict_omits_defaults() -> None:
    assert Voice(name="A", color="#123456").to_dict() == {
        "name": "A",
        "color": "#123456",
        "lane": 0,
        "description": "",
    }
    v = Voice(name="t", aliases=("r",), glyph="…", syntax="tag", temperature=0.5, top_p=0.9)
    d = v.to_dict()
    assert d["aliases"] == ["r"] and d["syntax"] == "tag" and d["temperature"] == 0.5
    assert "vector" not in d
    steered = Voice(name="Doubt", vector=-1.5)
    assert steered.to_dict()["vector"] == -1.5
    assert voice_set_from_dict({"voices": [steered.to_dict()]}).voices[0].vector == -1.5
    assert voice_set_from_dict({"voices": [{"name": "A", "vector": 0}]}).voices[0].vector == 0.0
