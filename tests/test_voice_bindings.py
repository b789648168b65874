"""Per-voice model bindings (voice-set ``backend`` / ``model`` / ``base_url`` / ``adapter``):
loading and errors, the settings a bound voice speaks with, and a council whose members speak
through the backends their voices name (one backend per distinct binding)."""

from __future__ import annotations

from pathlib import Path

import pytest
from council_scripted import ScriptedBackend, as_speaker

from thoughtform.backends.base import Backend, BackendError
from thoughtform.conversation import ChatSettings, backend_options, voice_settings
from thoughtform.council import Council, CouncilError, member_backends, turns_of
from thoughtform.trace import load_trace
from thoughtform.voices import (
    VoiceSetError,
    json_schema,
    load_voice_set,
    voice_set_from_dict,
)

BOUND = """\
name: bound
voices:
  - name: Echo
  - name: Doubt
    backend: openai
    model: some-model
    base_url: http://127.0.0.1:9/v1
  - name: Pulse
    backend: llamacpp
    adapter: pulse-lora.gguf
  - name: Shift
    backend: replay
    model: shift.txt
"""


def test_bindings_load_dump_and_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "bound.yaml"
    p.write_text(BOUND, encoding="utf-8")
    vs = load_voice_set(p)
    echo, doubt, pulse, shift = vs.voices
    assert not echo.bound and echo.backend is None and echo.model is None
    assert (doubt.backend, doubt.model, doubt.base_url) == (
        "openai",
        "some-model",
        "http://127.0.0.1:9/v1",
    )
    assert (pulse.backend, pulse.model, pulse.adapter) == ("llamacpp", None, "pulse-lora.gguf")
    assert shift.bound and shift.model == "shift.txt"
    assert echo.binding == {} and pulse.binding == {
        "backend": "llamacpp",
        "adapter": "pulse-lora.gguf",
    }
    d = vs.to_dict()["voices"]
    assert "backend" not in d[0]
    assert d[1]["backend"] == "openai" and d[1]["base_url"] == "http://127.0.0.1:9/v1"
    assert "model" not in d[2] and d[2]["adapter"] == "pulse-lora.gguf"
    again = voice_set_from_dict(vs.to_dict(), "again")
    assert again.voices == vs.voices
    props = json_schema()["properties"]["voices"]["items"]["anyOf"][1]["properties"]
    assert props["backend"]["enum"] == ["llamacpp", "openai", "transformers", "replay"]
    assert {"model", "base_url", "adapter"} <= set(props)


@pytest.mark.parametrize(
    ("voice", "field", "problem"),
    [
        ("backend: ollama", "voices[1].backend", "must be one of llamacpp, openai"),
        ("backend: 3", "voices[1].backend", "must be a string, got int"),
        ("model: x.gguf", "voices[1].model", "needs backend:"),
        ("backend: llamacpp\n    base_url: http://x/v1", "voices[1].base_url", "only the openai"),
        ("backend: openai\n    base_url: ftp://x", "voices[1].base_url", "http(s) URL"),
        ("backend: openai\n    adapter: a.gguf", "voices[1].adapter", "only the llamacpp"),
        ("backend: replay", "voices[1].model", "needs the recording"),
    ],
)
def test_bad_bindings_name_the_file_and_field(
    tmp_path: Path, voice: str, field: str, problem: str
) -> None:
    p = tmp_path / "bad.yaml"
    text = f"voices:\n  - name: Echo\n  - name: Doubt\n    {voice}\n"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(VoiceSetError) as e:
        load_voice_set(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {field}: ") and problem in msg
    assert "\n" not in msg
    # The field's line (or, for a field left out, the voice's own).
    key = field.rsplit(".", 1)[1] + ":"
    lines = [i + 1 for i, x in enumerate(text.splitlines()) if x.strip().startswith(key)]
    assert msg.endswith(f" (line {lines[0] if lines else 3})")


def test_voice_settings_overlay_the_shared_settings() -> None:
    vs = voice_set_from_dict(
        {
            "voices": [
                "Echo",
                {"name": "Doubt", "backend": "openai", "base_url": "http://h:1/v1"},
                {"name": "Pulse", "backend": "llamacpp", "adapter": "p.gguf"},
                {"name": "Shift", "backend": "llamacpp", "model": "other.gguf"},
            ]
        }
    )
    shared = ChatSettings(backend="llamacpp", model="embedded", temperature=0.3, seed=4)
    echo, doubt, pulse, shift = (voice_settings(shared, v) for v in vs.voices)
    assert echo is shared
    # another backend: its own defaults, the shared sampling
    assert (doubt.backend, doubt.model, doubt.base_url) == ("openai", None, "http://h:1/v1")
    assert (doubt.temperature, doubt.seed) == (0.3, 4)
    # the same backend: what the voice leaves out is the shared settings'
    assert (pulse.backend, pulse.model, pulse.adapter) == ("llamacpp", "embedded", "p.gguf")
    assert backend_options(pulse) == {"model": None, "lora_path": "p.gguf"}
    assert shift.model == "other.gguf" and shift.adapter is None
    with pytest.raises(BackendError, match="only the llamacpp backend takes a LoRA adapter"):
        backend_options(ChatSettings(backend="transformers", adapter="p.gguf"))


def test_member_backends_open_one_backend_per_distinct_binding() -> None:
    vs = voice_set_from_dict(
        {
            "voices": [
                "Echo",
                {"name": "Doubt", "backend": "replay", "model": "a.txt"},
                {"name": "Pulse", "backend": "replay", "model": "a.txt"},
                {"name": "Shift", "backend": "replay", "model": "b.txt"},
                {"name": "Role", "backend": "llamacpp"},  # the same as the shared settings
            ]
        }
    )
    shared_settings = ChatSettings(backend="llamacpp", model="embedded-voices")
    shared = ScriptedBackend(as_speaker())
    opened: list[ChatSettings] = []

    def open_backend(s: ChatSettings) -> Backend:
        opened.append(s)
        return ScriptedBackend(
            as_speaker(f"from {s.model}"), name=s.backend, model_name=s.model or ""
        )

    got = member_backends(
        vs, ["Echo", "Doubt", "Pulse", "Shift", "Role"], shared_settings, open_backend, shared
    )
    assert [s.model for s in opened] == ["a.txt", "b.txt"]
    assert set(got) == {"Doubt", "Pulse", "Shift", "Role"}
    assert got["Doubt"] is got["Pulse"] and got["Shift"] is not got["Doubt"]
    assert got["Role"] is shared

    def broken(s: ChatSettings) -> Backend:
        raise BackendError("a.txt: file not found")

    with pytest.raises(CouncilError, match=r"^voice Doubt \(backend: replay\): a.txt: file not"):
        member_backends(vs, ["Doubt"], shared_settings, broken, shared)


def test_a_council_runs_each_member_on_its_binding_and_records_it(tmp_path: Path) -> None:
    vs = voice_set_from_dict(
        {"voices": ["Echo", {"name": "Doubt", "backend": "openai", "base_url": "http://h:1/v1"}]}
    )
    shared = ScriptedBackend(as_speaker("shared words"))
    own: list[ScriptedBackend] = []

    def open_backend(s: ChatSettings) -> Backend:
        b = ScriptedBackend(as_speaker("server words"), name=s.backend, model_name="srv-model")
        own.append(b)
        return b

    path = tmp_path / "c.jsonl"
    c = Council(
        vs,
        ["Echo", "Doubt"],
        shared,
        "round-robin",
        settings=ChatSettings(backend="llamacpp"),
        open_backend=open_backend,
        trace_path=path,
    )
    c.say("Is the sea blue?")
    for _ in c.run(4):
        pass
    trace = c.close()
    assert len(own) == 1 and len(own[0].requests) == 2 and len(shared.requests) == 2
    ran = [(t.voice, t.backend, t.model, t.text) for t in turns_of(load_trace(path))[1:]]
    assert ran == [
        ("Echo", "scripted", "script", "shared words"),
        ("Doubt", "openai", "srv-model", "server words"),
        ("Echo", "scripted", "script", "shared words"),
        ("Doubt", "openai", "srv-model", "server words"),
    ]
    assert trace.meta["member_backends"] == {"Doubt": {"backend": "openai", "model": "srv-model"}}
    # Restored from its trace, the council opens the bindings again (its voice set is in meta).
    again = Council.from_trace(
        load_trace(path), shared, settings=ChatSettings(), open_backend=open_backend
    )
    assert again.backend_for("Doubt") is own[1] and again.backend_for("Echo") is shared


def test_cli_bad_bindings_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from thoughtform.cli import main

    sea = Path(__file__).parent / "fixtures" / "council" / "sea.txt"
    args = ["council", "--backend", "replay", "--model", str(sea), "--prompt", "Hi"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("voices:\n  - name: Echo\n  - name: Doubt\n    backend: olama\n", "utf-8")
    assert main([*args, "--voices", str(bad), "--members", "Echo,Doubt"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}: voices[1].backend: must be one of" in err and "\n" not in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        "voices:\n  - name: Echo\n  - name: Doubt\n    backend: replay\n    model: nope.txt\n",
        "utf-8",
    )
    assert main([*args, "--voices", str(missing), "--members", "Echo,Doubt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "voice Doubt (backend: replay): " in err and "nope.txt" in err and "\n" not in err
