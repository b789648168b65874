"""``eval council``: the measures on hand-built turns, usage errors, one short real run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from thoughtform.cli import main
from thoughtform.council import Turn
from thoughtform.evaluate.council import score_councils
from thoughtform.voices import PRESETS

SEED = PRESETS["seed"]
TINY = Path(__file__).parent / "fixtures" / "train" / "tiny.jsonl"


class KeywordClassifier:
    """Names the voice whose name the text starts with (a stand-in with known answers)."""

    labels = sorted(v.name for v in SEED.voices)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [next((v for v in self.labels if t.startswith(v.lower())), "Echo") for t in texts]


def test_score_councils_counts_what_the_docstring_says() -> None:
    councils = [
        [
            Turn(1, "Echo", "echo says it again"),
            Turn(2, "Doubt", "doubt asks: [Pulse] is it?"),  # in character, but a leak
            Turn(3, "Pulse", "", echoed=1),  # empty: a miss
        ],
        [Turn(1, "Doubt", "pulse-like words"), Turn(2, "Echo", "echo and [/echo]")],
    ]
    r = score_councils(councils, KeywordClassifier(), SEED)  # type: ignore[arg-type]
    s = r.summary()
    assert s["n_prompts"] == 2 and s["n_turns"] == 5
    assert s["in_character"] == pytest.approx(3 / 5)
    assert s["marker_leaks"] == 1  # its own close marker is no leak
    assert s["empty_turns"] == 1 and s["echoed"] == 1
    assert s["chance"] == pytest.approx(0.125)
    assert s["per_voice"] == {"Echo": 1.0, "Doubt": 0.5, "Pulse": 0.0}
    assert [t["voice"] for t in r.councils[1]] == ["Doubt", "Echo"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--members", "Echo,Nobody"], "--members: unknown voice 'Nobody'"),
        (["--policy", "manual"], "--policy: expected one of"),
        (["--turns", "0"], "--turns must be >= 1"),
        (["--prompts", "/nonexistent/p.txt"], "/nonexistent/p.txt: no such file"),
    ],
)
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "council", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.model
def test_short_real_council_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Why is the sky blue?\n", encoding="utf-8")
    save = tmp_path / "turns.jsonl"
    argv = ["eval", "council", "--prompts", str(prompts), "--dataset", str(TINY)]
    argv += ["--turns", "2", "--max-tokens", "24", "--json", "--save", str(save)]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert {"n_turns", "in_character", "marker_leaks", "empty_turns"} <= set(s)
    assert s["n_turns"] == 2 and 0.0 <= s["in_character"] <= 1.0
    rows = [json.loads(x) for x in save.read_text(encoding="utf-8").splitlines()]
    assert [t["voice"] for t in rows[0]["turns"]] == ["Echo", "Doubt"]
