"""The workbench's page-side rules without a browser: colours that stay put, the voices table,
Settings checks and switches, the empty chat's facts, errors in the chat, session names and
the default voice set for new sessions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.colors import VoiceColors, fill_colors, fresh_color
from thoughtform.ui.config import ServeConfig
from thoughtform.ui.service import NEW_TITLE, Tab, Workbench, session_title
from thoughtform.ui.settings_view import declared_capabilities, model_problem, telemetry_switches
from thoughtform.ui.stream import (
    EXAMPLE_PROMPTS,
    ends_in_error,
    error_event,
    info_event,
    payload,
)
from thoughtform.ui.voice_defaults import defaults_path, load_default_voices
from thoughtform.ui.voices_view import (
    VOICE_COLUMNS,
    add_row,
    remove_row,
    voice_rows,
    voices_from_rows,
    voices_from_yaml,
)
from thoughtform.voices import MAIN_COLOR, PALETTE, PRESETS, VoiceSetError, voice_set_from_dict

FIX = Path(__file__).parent / "fixtures" / "ui"
SEEN = ["Doubt", "Pulse", "Glimmer", "Shift"]  # undeclared voices in voices.jsonl, in order
ONLY_ECHO = {"name": "mine", "unknown": "lenient", "voices": [{"name": "Echo", "color": "#BB5500"}]}


def _shown(data: dict[str, Any]) -> dict[str, str]:
    colors = VoiceColors(voice_set_from_dict(data))
    for name in SEEN:
        colors.color(name)
    return colors.shown()


def _colours_after(data: dict[str, Any], seen: list[str]) -> dict[str, str]:
    colors = VoiceColors(voice_set_from_dict(data))
    return {n: colors.color(n) for n in ["Echo", *seen]}


# -- colours ----------------------------------------------------------------------------------


def test_adding_a_voice_recolours_no_other() -> None:
    shown = _shown(ONLY_ECHO)
    assert set(shown) == {"Echo", *SEEN}
    new = {**ONLY_ECHO, "voices": [*ONLY_ECHO["voices"], {"name": "Witness"}]}
    # Hashing "Witness" into the palette regardless of what was shown took Shift's colour,
    # and Shift (coloured first come, first served) moved: the bug this guards against.
    plain = voice_set_from_dict(new)
    assert plain.color_of("Witness") == shown["Shift"]
    filled = voice_set_from_dict(fill_colors(new, shown))
    witness = filled.color_of("Witness")
    assert witness not in shown.values() and witness != MAIN_COLOR
    after = _colours_after(fill_colors(new, shown), SEEN)
    assert after == {n: shown[n] for n in ["Echo", *SEEN]}


def test_declaring_a_shown_voice_keeps_its_colour_and_the_others() -> None:
    shown = _shown(ONLY_ECHO)
    for name in SEEN:
        new = {**ONLY_ECHO, "voices": [*ONLY_ECHO["voices"], {"name": name}]}
        filled = fill_colors(new, shown)
        vs = voice_set_from_dict(filled)
        assert vs.color_of(name) == shown[name]
        others = [n for n in SEEN if n != name]
        assert _colours_after(filled, others) == {n: shown[n] for n in ["Echo", *others]}


def test_explicit_colours_win_and_fresh_colours_avoid_everything_taken() -> None:
    shown = {"Echo": "#BB5500"}
    data = {"voices": [{"name": "Echo", "color": "#112233"}, {"name": "New"}]}
    vs = voice_set_from_dict(fill_colors(data, shown))
    assert vs.color_of("Echo") == "#112233"
    assert vs.color_of("New") not in ("#112233", "#BB5500", MAIN_COLOR)
    # With the whole palette taken, the extra colours come next, then generated ones.
    taken = list(PALETTE)
    c = fresh_color("x", taken)
    assert c not in PALETTE and c.startswith("#")
    assert fresh_color("", []) == PALETTE[0]


# -- the voices table -------------------------------------------------------------------------


def test_table_rows_add_remove_and_per_voice_sampling() -> None:
    seed = PRESETS["seed"]
    rows = voice_rows(seed)
    assert len(rows) == 8 and all(len(r) == len(VOICE_COLUMNS) for r in rows)
    grown = add_row(rows)
    assert len(grown) == 9 and grown[-1][0] == "" and grown[-1][1] == ""
    grown[-1][0] = "Witness"
    grown[-1][6] = "0.9"
    grown[-1][7] = "0.5"
    vs = voices_from_rows(grown, seed, {v.name: v.color for v in seed.voices})
    w = vs.get("Witness")
    assert w is not None and (w.temperature, w.top_p) == (0.9, 0.5)
    assert w.color not in {v.color for v in seed.voices}  # not a duplicate of Echo's
    assert [v.color for v in vs.voices[:8]] == [v.color for v in seed.voices]
    again = voice_rows(vs)
    assert again[-1][6:] == ["0.9", "0.5"]
    assert [r[0] for r in remove_row(again, 2)] == [v.name for v in vs.voices if v.name != "Inner"]
    assert remove_row(again, 99) == again and remove_row(again, None) == again
    with pytest.raises(VoiceSetError, match=r"voices\[0\]\.temperature: must be a number"):
        voices_from_rows([["Echo", "", "", "", "", "", "warm", ""]], seed)
    with pytest.raises(VoiceSetError, match="top_p"):
        voices_from_rows([["Echo", "", "", "", "", "", "", "3"]], seed)


def test_yaml_without_colours_keeps_the_shown_ones() -> None:
    shown = _shown(ONLY_ECHO)
    vs = voices_from_yaml("voices: [Echo, Glimmer, Witness]\nunknown: lenient\n", shown)
    assert vs.color_of("Glimmer") == shown["Glimmer"]
    assert vs.color_of("Witness") not in shown.values()
    with pytest.raises(VoiceSetError, match="color"):
        voices_from_yaml("voices:\n  - name: Echo\n    color: red\n", shown)


# -- Settings ---------------------------------------------------------------------------------


def test_switches_follow_declared_capabilities() -> None:
    assert telemetry_switches("transformers") == (True, True)
    for name in ("llamacpp", "openai", "replay", "no-such-backend"):
        assert telemetry_switches(name) == (False, False), name
    caps = declared_capabilities("transformers")
    assert caps is not None and caps.attention and caps.exact_entropy


@pytest.mark.parametrize(
    ("backend", "model", "base", "says"),
    [
        ("transformers", "embedded-voices", None, ""),
        ("transformers", "embedded", None, ""),
        ("transformers", "", None, ""),
        ("llamacpp", "embedded-voices", None, ""),
        ("transformers", "Qwen/Qwen3-8B", None, "never downloads"),
        ("llamacpp", "http://127.0.0.1:8080/v1", None, "choose the openai backend"),
        ("transformers", "https://example.org/v1", None, "choose the openai backend"),
        ("openai", "/models/x.gguf", "http://127.0.0.1:8000/v1", "choose the llamacpp backend"),
        ("openai", "embedded-voices", "http://127.0.0.1:8000/v1", "runs here"),
        ("openai", "Qwen/Qwen3-8B", None, "needs a base URL"),
        ("openai", "Qwen/Qwen3-8B", "http://127.0.0.1:8000/v1", ""),
        ("llamacpp", "Qwen/Qwen3-8B", None, "needs a .gguf model path"),
        ("llamacpp", "/no/such/model.gguf", None, "no such file"),
        ("replay", "voices.jsonl", None, ""),
    ],
)
def test_model_is_checked_against_the_backend(
    backend: str, model: str, base: str | None, says: str
) -> None:
    got = model_problem(backend, model, base)
    assert (says in got) if says else got == "", got


def test_llamacpp_refuses_a_model_directory(tmp_path: Path) -> None:
    assert "transformers" in model_problem("llamacpp", str(tmp_path))
    assert model_problem("transformers", str(tmp_path)) == ""


def _wb(tmp_path: Path, **kw: Any) -> Workbench:
    cfg = ServeConfig(
        backend="replay", replay=str(FIX / "voices.jsonl"), db=str(tmp_path / "s.db"), **kw
    )
    return Workbench(cfg)


def test_attention_flags_reach_the_request(tmp_path: Path) -> None:
    wb = _wb(tmp_path)
    try:
        info = wb.new_session()
        assert wb.settings_of(info)["attention"] is False
        s = wb.save_settings(info.id, {"backend": "transformers", "attention": True})
        assert (s["attention"], s["logit_lens"]) == (True, False)
        info = wb.store.get_session(info.id)
        assert info is not None
        s = wb.settings_of(info)
        req = wb._request(info, wb.voices_of(info), s)
        assert req.attention is True and req.logit_lens is False
        s = wb.save_settings(info.id, {**s, "logit_lens": True})
        info = wb.store.get_session(info.id)
        assert info is not None
        assert wb._request(info, wb.voices_of(info), wb.settings_of(info)).logit_lens is True
    finally:
        wb.close()


# -- the empty chat, errors, names ------------------------------------------------------------


def test_info_event_names_backend_model_and_voices() -> None:
    seed = PRESETS["seed"]
    ev = info_event({"backend": "llamacpp", "model": ""}, seed)
    assert ev[0] == "I"
    assert ev[1]["backend"] == "llamacpp" and ev[1]["model"] == "embedded (SmolLM2-135M)"
    assert ev[1]["voices"].startswith("seed: Echo, Resonance")
    assert ev[1]["examples"] == list(EXAMPLE_PROMPTS)
    ev = info_event({"backend": "openai", "model": "m", "base_url": "http://h/v1"}, seed)
    assert ev[1]["model"] == "m at http://h/v1"


def test_error_payloads_and_failed_reply_detection() -> None:
    raw = payload("sid", [error_event("<img src=x onerror=alert(1)>")])
    assert json.loads(raw)["ev"] == [["!", "<img src=x onerror=alert(1)>"]]  # data, not markup
    assert ends_in_error(payload("s", [["E", "error", "boom", None]]))
    assert not ends_in_error(payload("s", [["E", "done", "", None]]))
    # Model text that spells the event is escaped inside its string: no false alarm.
    assert not ends_in_error(payload("s", [["T", '["E","error"]', 3]]))


def test_session_title_from_the_first_prompt(tmp_path: Path) -> None:
    assert session_title("  Is the\nsea   blue? ") == "Is the sea blue?"
    long = "word " * 40
    t = session_title(long)
    assert t.endswith("…") and len(t) <= 61 and " " not in t[-2:]
    assert session_title("   ") == NEW_TITLE
    wb = _wb(tmp_path)
    try:
        info = wb.new_session()
        assert info.title == NEW_TITLE
        for _ in wb.send(Tab(info.id, 0), "Will the rain stop?"):
            pass
        got = wb.store.get_session(info.id)
        assert got is not None and got.title == "Will the rain stop?"
        for _ in wb.send(Tab(info.id, 2), "and then?"):
            pass
        got = wb.store.get_session(info.id)
        assert got is not None and got.title == "Will the rain stop?"  # only the first names it
        other = wb.new_session()
        wb.rename(other.id, "Mine")
        for _ in wb.send(Tab(other.id, 0), "hello"):
            pass
        got = wb.store.get_session(other.id)
        assert got is not None and got.title == "Mine"  # renamed before: kept
    finally:
        wb.close()


# -- the default voice set ----------------------------------------------------------------------


def test_use_for_new_sessions(tmp_path: Path) -> None:
    wb = _wb(tmp_path)
    try:
        mine = voices_from_yaml("name: mine\nvoices:\n  - name: Witness\n    color: '#123456'\n")
        old = wb.new_session()
        assert wb.voices_of(old).name == "seed"
        wb.set_default_voices(mine)
        new = wb.new_session()
        assert wb.voices_of(new) == mine
        # Sessions made before keep theirs.
        got = wb.store.get_session(old.id)
        assert wb.voices_of(got).name == "seed"
        path = defaults_path(wb.store.path)
        assert path.parent == Path(wb.store.path).parent
        assert path.stat().st_mode & 0o077 == 0  # owner only
        # A broken file is ignored, not fatal: new sessions get the server's set.
        path.write_text("{not json", encoding="utf-8")
        assert load_default_voices(path) is None
        assert wb.voices_of(wb.new_session()).name == "seed"
    finally:
        wb.close()


def test_default_voices_are_per_user_with_a_login(tmp_path: Path) -> None:
    wb = _wb(tmp_path, auth=[("ann", "pw-a"), ("bob", "pw-b")])
    try:
        mine = voices_from_yaml("name: anns\nvoices: [Witness]\n")
        wb.set_default_voices(mine, user="ann")
        assert wb.voices_of(wb.new_session(user="ann")).name == "anns"
        assert wb.voices_of(wb.new_session(user="bob")).name == "seed"
        assert defaults_path(wb.store.path, "ann") != defaults_path(wb.store.path, "bob")
    finally:
        wb.close()
