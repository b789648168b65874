"""``thoughtform council`` on the replay backend: golden output, manual turns from stdin,
the trace it writes, and one-line usage errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from thoughtform.cli import main
from thoughtform.council import turns_of
from thoughtform.trace import load_trace

FIX = Path(__file__).parent / "fixtures" / "council"
SEA = str(FIX / "sea.txt")  # one reply in four voices, replayed for every turn


def council(*args: str) -> list[str]:
    return ["council", "--backend", "replay", "--model", SEA, "--prompt", "Is the sea blue?", *args]


def test_golden_round_robin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(council("--turns", "5")) == 0
    out = capsys.readouterr().out
    # Each turn is the speaker's own part of the replayed reply, under its label; the matrix
    # says what share of each speaker's words it took from whom.
    assert out == (FIX / "golden_round_robin.txt").read_text(encoding="utf-8")


def test_manual_asks_who_speaks_next(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pulse\nInner\nShift\n\n"))
    trace = tmp_path / "c.jsonl"
    assert main(council("--policy", "manual", "--turns", "5", "--trace", str(trace))) == 0
    out = capsys.readouterr().out
    assert out.count("who speaks next? Echo / Doubt / Pulse / Shift") == 3
    assert "not a member who may speak: 'Inner'" in out
    assert "[Pulse] ♥  (your pick)\nSalt on the lips.\n" in out
    assert "[Shift] ↻  (your pick)\nFrom under" in out
    turns = turns_of(load_trace(trace))
    assert [(t.voice, t.by) for t in turns] == [
        (None, "user"),
        ("Pulse", "user"),
        ("Shift", "user"),
    ]
    assert turns[1].skipped == 2 and turns[1].echoed == 1  # Echo's and Doubt's blocks skipped


def test_trace_holds_every_turn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "council.jsonl"
    assert main(council("--turns", "2", "--trace", str(path), "--members", "Doubt,Echo")) == 0
    assert "trace:" in capsys.readouterr().err
    recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert recs[0]["kind"] == "council" and recs[0]["members"] == ["Doubt", "Echo"]
    opened = [r for r in recs if r["type"] == "turn"]
    assert [r["voice"] for r in opened] == [None, "Doubt", "Echo"]
    assert all(r["policy"] == "round-robin" for r in opened)
    ends = {r["index"]: r for r in recs if r["type"] == "turn_end"}
    assert ends[1]["text"] == "Is the sea blue, or is it the sky in it?"
    assert ends[1]["finish"] == "cut"  # the replay goes on in Pulse's voice: cut there
    assert {r["turn"] for r in recs if r["type"] == "token"} == {1, 2}
    assert recs[-1]["type"] == "end"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--members", "Echo,Nobody"], "--members: unknown voice 'Nobody'"),
        (["--policy", "model"], "policy model: backend 'replay' cannot score who speaks next"),
        (["--talkativeness", "Echo=2"], "--talkativeness 'Echo=2': expected NAME=P"),
        (["--mute", "Echo", "--members", "Echo"], "every member is muted"),
        (["--turns", "-1"], "--turns must be >= 0"),
        (["--counterfactual"], "--counterfactual: backend 'replay' cannot score text"),
    ],
)
def test_usage_errors_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(council(*args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("thoughtform: error:")


def test_missing_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["council", "--backend", "replay", "--model", SEA]) == 2
    assert "give --prompt TEXT" in capsys.readouterr().err
