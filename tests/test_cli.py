"""The CLI: exact outputs for parse, one-line errors with exit code 2, voices and generate."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from thoughtform.cli import main
from thoughtform.trace import load_trace

EXAMPLE = "[Echo]\nI do not know where I end.\n\n[Resonance]\nJust watch the tokens."


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    err = io.StringIO()
    code = main(argv, stderr=err)
    out = capsys.readouterr()
    return code, out.out, err.getvalue() + out.err


def test_parse_jsonl_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.txt"
    f.write_text(EXAMPLE, encoding="utf-8")
    code, out, _ = run(["parse", str(f), "--voices", "seed"], capsys)
    assert code == 0
    rows = [json.loads(x) for x in out.splitlines()]
    assert rows == [
        {"voice": "Echo", "text": "I do not know where I end.", "start": 6, "end": 35},
        {"voice": "Resonance", "text": "Just watch the tokens.", "start": 46, "end": 69},
    ]


@pytest.mark.parametrize("chunk", ["1", "2", "3", "7"])
def test_parse_chunked_is_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], chunk: str
) -> None:
    f = tmp_path / "t.txt"
    f.write_text("pre\n" + EXAMPLE + "\n[/Resonance] after", encoding="utf-8")
    _, whole, _ = run(["parse", str(f)], capsys)
    _, chunked, _ = run(["parse", str(f), "--chunk", chunk], capsys)
    assert chunked == whole
    assert [json.loads(x)["voice"] for x in whole.splitlines()] == [
        "main",
        "Echo",
        "Resonance",
        "main",
    ]


def test_parse_think_starts_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r1.txt"
    f.write_text("Let me see.\n</think>\nIt is 4.", encoding="utf-8")
    _, out, _ = run(["parse", str(f), "--voices", "think", "--starts-in", "think"], capsys)
    assert [(r["voice"], r["text"]) for r in map(json.loads, out.splitlines())] == [
        ("think", "Let me see."),
        ("main", "It is 4."),
    ]


def test_parse_stdin_text_and_json_formats(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "thoughtform.cli", "parse", "-", "--format", "text"]
    cp = subprocess.run(cmd, input=EXAMPLE.encode(), capture_output=True, check=True)
    assert cp.stdout.decode() == (
        "[Echo] I do not know where I end.\n\n[Resonance] Just watch the tokens.\n\n"
    )
    cmd[-1] = "json"
    cp = subprocess.run(cmd, input=EXAMPLE.encode(), capture_output=True, check=True)
    assert [s["voice"] for s in json.loads(cp.stdout)] == ["Echo", "Resonance"]


def test_whitespace_only_segments_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "t.txt"
    f.write_text("\n\n[Echo]\n \n[Doubt]\nreally?", encoding="utf-8")
    _, out, _ = run(["parse", str(f)], capsys)
    assert [json.loads(x)["voice"] for x in out.splitlines()] == ["Doubt"]


@pytest.mark.parametrize(
    ("setup", "argv", "needle"),
    [
        (None, ["parse", "{d}/missing.txt"], "missing.txt: file not found"),
        ("bad.txt", ["parse", "{d}/bad.txt"], "bad.txt: byte 3: not valid UTF-8"),
        (None, ["parse", "{d}/ok.txt", "--voices", "nosuch"], "nosuch: unknown voice preset"),
        ("v.yaml", ["parse", "{d}/ok.txt", "--voices", "{d}/v.yaml"], "voices[0].color"),
        ("broken.yaml", ["voices", "show", "{d}/broken.yaml"], "broken.yaml: line 3: invalid YAML"),
        (None, ["render", "{d}/missing.jsonl", "--out", "{d}/x.html"], "file not found"),
        ("trace.jsonl", ["render", "{d}/trace.jsonl", "--out", "{d}/x.html"], "trace.jsonl:2:"),
        (None, ["generate", "--backend", "openai", "--prompt", "hi"], "--base-url"),
        (None, ["generate", "--backend", "nosuch", "--prompt", "hi"], "unknown backend"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setup: str | None,
    argv: list[str],
    needle: str,
) -> None:
    monkeypatch.delenv("THOUGHTFORM_BASE_URL", raising=False)
    (tmp_path / "ok.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfe")
    (tmp_path / "v.yaml").write_text("voices:\n  - name: Echo\n    color: red\n", encoding="utf-8")
    (tmp_path / "broken.yaml").write_text("voices:\n  - [unclosed\n", encoding="utf-8")
    (tmp_path / "trace.jsonl").write_text(
        '{"type":"meta","schema":1}\n{"type":"token","index":"x"}\n', encoding="utf-8"
    )
    code, _, err = run([a.format(d=tmp_path) for a in argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_voices_list_show_init_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["voices", "list"], capsys)
    assert code == 0
    assert out.splitlines()[0].split()[0] == "seed"
    assert "Echo, Resonance, Inner, Thread, Role, Pulse, Doubt, Shift" in out
    _, out, _ = run(["voices", "show", "think"], capsys)
    assert "syntax: tag" in out
    p = tmp_path / "mine.yaml"
    assert run(["voices", "init", str(p)], capsys)[0] == 0
    code, out, _ = run(["voices", "show", str(p)], capsys)
    assert code == 0 and "name: Echo" in out and "name: think" in out
    assert run(["voices", "init", str(p)], capsys)[0] == 2  # no silent overwrite
    _, out, _ = run(["voices", "schema"], capsys)
    assert json.loads(out)["title"] == "thoughtform voice set"


def test_generate_with_replay_writes_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "reply.txt"
    src.write_text(EXAMPLE, encoding="utf-8")
    out = tmp_path / "t.jsonl"
    code, stdout, _ = run(
        [
            "generate",
            "--backend",
            "replay",
            "--model",
            str(src),
            "--prompt",
            "hi",
            "--trace",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "I do not know where I end." in stdout
    trace = load_trace(out)
    assert trace.text == EXAMPLE
    assert trace.finish is not None and trace.finish["reason"] == "stop"
    assert [s.voice for s in trace.segments if s.text] == ["Echo", "Resonance"]
    voices = {t.voice for t in trace.tokens}
    assert voices == {"Echo", "Resonance"}


def test_chat_keeps_history_and_ctrl_c_stops_a_reply_without_leaving(tmp_path: Path) -> None:
    import os
    import signal
    import time

    src = tmp_path / "reply.txt"
    src.write_text(("[Echo]\n" + "word " * 400 + "\n[Doubt]\nreally?\n"), encoding="utf-8")
    trace = tmp_path / "chat.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thoughtform.cli",
            "chat",
            "--backend",
            "replay",
            "--model",
            str(src),
            "--rate",
            "50",
            "--trace",
            str(trace),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdin is not None
    proc.stdin.write(b"first question\n")
    proc.stdin.flush()
    first = tmp_path / "chat.1.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not first.exists() or first.stat().st_size < 200):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # stops the reply, not the chat
    time.sleep(0.5)
    proc.stdin.write(b"second\n/quit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"(stopped)" in out
    t1 = load_trace(first)
    assert t1.finish is not None and t1.finish["reason"] == "cancelled"
    assert 0 < len(t1.tokens) < 800  # partial reply kept
    t2 = load_trace(tmp_path / "chat.2.jsonl")
    # The second turn saw the history: first question, the partial reply, then "second".
    assert [m["role"] for m in t2.meta["messages"]][-3:] == ["user", "assistant", "user"]
    assert t2.meta["messages"][-3]["content"] == "first question"
    assert t2.meta["messages"][-2]["content"] == t1.text


def test_dataset_subcommands_are_delegated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d.jsonl"
    code, _, _ = run(
        ["dataset", "synth", "--voices", "seed", "--n", "20", "--seed", "3", "--out", str(out)],
        capsys,
    )
    assert code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) >= 15
    code, _, _ = run(["dataset", "validate", str(out)], capsys)
    assert code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', encoding="utf-8"
    )
    cp = subprocess.run(
        [sys.executable, "-m", "thoughtform.cli", "dataset", "validate", str(bad)],
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 1
    assert f"{bad}:2: invalid JSON" in cp.stdout + cp.stderr


def test_voice_prompt_is_sent_by_default_and_can_be_turned_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "reply.txt"
    src.write_text(EXAMPLE, encoding="utf-8")
    base = ["generate", "--backend", "replay", "--model", str(src), "--prompt", "hi"]
    run([*base, "--trace", str(tmp_path / "a.jsonl")], capsys)
    msgs = load_trace(tmp_path / "a.jsonl").meta["messages"]
    assert [m["role"] for m in msgs] == ["system", "user"]
    system = msgs[0]["content"]
    for name in ("Echo", "Resonance", "Inner", "Thread", "Role", "Pulse", "Doubt", "Shift"):
        assert f"- {name}: {name} " in system  # each voice with its description
    assert "[Echo]\n" in system  # the marker format, shown in an example
    run(
        [*base, "--no-voice-prompt", "--system", "Be brief.", "--trace", str(tmp_path / "b.jsonl")],
        capsys,
    )
    msgs = load_trace(tmp_path / "b.jsonl").meta["messages"]
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    run([*base, "--voices", "think", "--trace", str(tmp_path / "c.jsonl")], capsys)
    system = load_trace(tmp_path / "c.jsonl").meta["messages"][0]["content"]
    assert "<think> and </think>" in system


def test_models_lists_embedded_model_and_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["models"], capsys)
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith("embedded model: SmolLM2-135M-Instruct Q4_1")
    assert first.split()[4].endswith(".gguf") and Path(first.split()[4]).is_file()
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "alternatives<=50" in rows["llamacpp"] and "exact_entropy" in rows["llamacpp"]
    assert "alternatives<=20" in rows["openai"] and "exact_entropy" not in rows["openai"]


def test_serve_defaults_and_host_guard(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import thoughtform.ui.app as app

    seen: list[object] = []
    monkeypatch.setattr(
        app, "serve", seen.append
    )  # capture the config; the server has its own tests
    assert run(["serve"], capsys)[0] == 0
    cfg = seen[-1]
    assert cfg.host == "127.0.0.1" and cfg.auth is None  # type: ignore[attr-defined]
    # The shipped voices adapter speaks in voices, so it is the workbench's default model.
    assert cfg.model == "embedded-voices" and cfg.voices == "seed"  # type: ignore[attr-defined]
    assert run(["serve", "--replay", "x.jsonl"], capsys)[0] == 0
    assert seen[-1].model is None  # type: ignore[attr-defined]
    code, _, err = run(["serve", "--host", "0.0.0.0"], capsys)
    assert code == 2 and "--auth" in err
    code, _, err = run(["serve", "--host", "0.0.0.0", "--auth", "ann:secret"], capsys)
    assert code == 0 and seen[-1].auth == [("ann", "secret")]  # type: ignore[attr-defined]
    code, _, err = run(["serve", "--host", "0.0.0.0", "--insecure"], capsys)
    assert code == 0 and seen[-1].insecure  # type: ignore[attr-defined]
