"""Voice vectors in the workbench without a browser: what the Voices tab's sliders show and
write, the session switch that turns vectors on, the plan a reply is generated with, the lanes'
K events, and one short real reply on the embedded llama.cpp model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thoughtform.trace import TokenRecord
from thoughtform.ui.config import ServeConfig
from thoughtform.ui.service import VOICE_VECTORS, Tab, Workbench
from thoughtform.ui.stream import Encoder
from thoughtform.ui.voices_view import (
    MAX_VECTOR_SLIDERS,
    vector_sliders,
    voice_rows,
    voices_from_rows,
    voices_from_yaml,
    with_vector_strengths,
)
from thoughtform.vectors.sets import VectorSet, load_vector_set
from thoughtform.voices import PRESETS, VoiceSet, voice_set_from_dict

FIX = Path(__file__).parent / "fixtures" / "ui"


@pytest.fixture(scope="module")
def vset() -> VectorSet:
    return load_vector_set(VOICE_VECTORS)


def vector_of(vs: VoiceSet, name: str) -> float | None:
    v = vs.get(name)
    assert v is not None
    return v.vector


def _with(vs: VoiceSet, **vectors: float) -> VoiceSet:
    data = vs.to_dict()
    for d in data["voices"]:
        if d["name"] in vectors:
            d["vector"] = vectors[d["name"]]
    return voice_set_from_dict(data)


def test_sliders_show_the_strength_a_reply_uses(vset: VectorSet) -> None:
    seed = PRESETS["seed"]
    shown = {s.voice: s for s in vector_sliders(_with(seed, Doubt=0.5, Pulse=3.0), vset)}
    assert list(shown) == [v.name for v in sorted(seed.voices, key=lambda v: v.lane)]
    assert shown["Doubt"].strength == 0.5  # the voice set's own
    assert shown["Echo"].strength == vset.strength("Echo", seed)  # the set's default
    assert shown["Pulse"].strength == 2.0  # beyond the sliders: shown at their end
    assert all(s.steerable for s in shown.values())
    # A voice with no direction in the set cannot be steered; nothing loaded: none can.
    mine = voices_from_yaml("name: mine\nvoices:\n  - name: Nobody\n    vector: 0.7\n")
    (only,) = vector_sliders(mine, vset)
    assert (only.voice, only.strength, only.steerable) == ("Nobody", 0.7, False)
    assert not any(s.steerable for s in vector_sliders(seed, None))


def test_a_moved_slider_writes_that_voice_only(vset: VectorSet) -> None:
    vs = _with(PRESETS["seed"], Pulse=3.0)
    before = vector_sliders(vs, vset)
    values = [s.strength for s in before]
    assert with_vector_strengths(vs, values, vset) is vs  # nothing moved: the same set
    k = [s.voice for s in before].index("Doubt")
    values[k] = 1.5
    out = with_vector_strengths(vs, values, vset)
    assert vector_of(out, "Doubt") == 1.5
    assert vector_of(out, "Pulse") == 3.0  # untouched, past the sliders' range
    assert vector_of(out, "Echo") is None  # still the set's default
    values[k] = 9.0  # clamped to the slider's range, validated by the library
    assert vector_of(with_vector_strengths(vs, values, vset), "Doubt") == 2.0
    mine = voices_from_yaml("name: mine\nvoices:\n  - name: Nobody\n")
    assert with_vector_strengths(mine, [1.0], vset) is mine  # not steerable: not written


def test_applying_the_table_keeps_the_strengths() -> None:
    vs = _with(PRESETS["seed"], Doubt=1.5)
    rows = voice_rows(vs)
    rows[[r[0] for r in rows].index("Doubt")][1] = "#112233"  # a colour edit in the table
    out = voices_from_rows(rows, vs)
    assert vector_of(out, "Doubt") == 1.5 and vector_of(out, "Echo") is None


def test_a_big_set_gets_a_slider_per_voice_up_to_the_pool(vset: VectorSet) -> None:
    names = [f"V{i}" for i in range(MAX_VECTOR_SLIDERS + 3)]
    vs = voices_from_yaml("name: big\nvoices:\n" + "".join(f"  - name: {n}\n" for n in names))
    assert len(vector_sliders(vs, vset)) == MAX_VECTOR_SLIDERS


def _wb(tmp_path: Path, **kw: object) -> Workbench:
    cfg = ServeConfig(db=str(tmp_path / "s.db"), **kw)  # type: ignore[arg-type]
    return Workbench(cfg)


def test_the_session_switch_and_strengths_reach_the_plan(tmp_path: Path) -> None:
    wb = _wb(tmp_path, backend="replay", replay=str(FIX / "voices.jsonl"))
    try:
        info = wb.new_session()
        s = wb.settings_of(info)
        assert s["voice_vectors"] is False
        assert dict(wb.chat_settings(s, wb.voices_of(info)).steer.vectors) == {}
        wb.set_voices(info.id, _with(wb.voices_of(info), Doubt=1.5, Echo=0.0))
        s = wb.save_settings(info.id, {**s, "voice_vectors": True})
        now = wb.store.get_session(info.id)
        assert now is not None and wb.settings_of(now)["voice_vectors"] is True
        plan = wb.chat_settings(wb.settings_of(now), wb.voices_of(now)).steer
        assert plan.vectors["Doubt"] == 1.5 and plan.vectors["Echo"] == 0.0
        assert plan.vector_dir == VOICE_VECTORS
        # A Settings save (which does not show the switch) keeps it.
        s = wb.save_settings(info.id, {**wb.settings_of(now), "temperature": 0.3})
        assert s["voice_vectors"] is True
    finally:
        wb.close()


def test_k_events_carry_the_vector_in_force() -> None:
    enc = Encoder(PRESETS["seed"])
    toks = [
        TokenRecord(index=0, text=" a", voice="Doubt", vector=[["Doubt", 1.5]]),
        TokenRecord(index=1, text=" b", voice="Echo"),
        TokenRecord(index=2, text=" c", voice="Echo", vector=[["<b>x</b>", 2.0], ["Echo", -0.5]]),
    ]
    evs = enc.token_events(toks, 10)
    assert [len(e) for e in evs] == [9, 8, 9]  # only tokens with a vector carry one
    assert evs[0][8] == [["Doubt", 1.5]]
    assert evs[2][8] == [["<b>x</b>", 2.0], ["Echo", -0.5]]  # data; the browser writes text
    json.dumps(evs)


@pytest.mark.model
def test_a_real_reply_is_steered_with_the_slider_strength(tmp_path: Path) -> None:
    """The embedded model with Doubt forced first and its vector at 1.5: every token after the
    marker records the vector in force (set by llama.cpp's decode loop, not by the test)."""
    pytest.importorskip("llama_cpp")
    wb = _wb(tmp_path, backend="llamacpp", model="embedded-voices", max_tokens=8)
    try:
        info = wb.new_session()
        vs, vset = wb.voices_of(info), load_vector_set(VOICE_VECTORS)
        values = [1.5 if sl.voice == "Doubt" else sl.strength for sl in vector_sliders(vs, vset)]
        wb.set_voices(info.id, with_vector_strengths(vs, values, vset))
        s = wb.settings_of(info)
        wb.save_settings(info.id, {**s, "voice_vectors": True, "next_voice": "Doubt", "seed": 1})
        for _ in wb.send(Tab(sid=info.id), "Is the sea blue?"):
            pass
        reply = [m for m in wb.store.messages(info.id) if m.role == "assistant"][-1]
        assert reply.tokens, reply.finish
        text = "".join(t.text for t in reply.tokens)
        assert text.startswith("[Doubt]"), text
        after = [t for t in reply.tokens if t.voice == "Doubt" and t.vector]
        assert after and all(t.vector == [["Doubt", 1.5]] for t in after)
    finally:
        wb.close()


def test_applying_the_table_keeps_each_voices_backend_binding() -> None:
    vs = voices_from_yaml(
        "name: bound\nvoices:\n  - name: Echo\n  - name: Doubt\n    backend: openai\n"
        "    model: big\n    base_url: http://127.0.0.1:9/v1\n"
    )
    rows = voice_rows(vs)
    rows[1][5] = "the doubter"  # a description edit in the table
    out = voices_from_rows(rows, vs)
    doubt = out.get("Doubt")
    assert doubt is not None and doubt.description == "the doubter"
    assert doubt.binding == {
        "backend": "openai",
        "model": "big",
        "base_url": "http://127.0.0.1:9/v1",
    }
    assert out.get("Echo") is not None and out.get("Echo").binding == {}  # type: ignore[union-attr]
