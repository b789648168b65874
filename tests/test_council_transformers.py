"""Attention resonance on the real embedded model (transformers backend, the voices GGUF): a
short council with attention on gives a well-formed turn x turn attention measure, in the
library and in the workbench's Council tab."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.backends.base import Sampling
from thoughtform.council import Council
from thoughtform.resonance import attention_scores, council_scores, voice_matrix
from thoughtform.voices import PRESETS

pytest.importorskip("transformers")
pytestmark = pytest.mark.model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub: the model is the packaged GGUF
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = PRESETS["seed"]
MEMBERS = ["Echo", "Doubt", "Pulse"]
TOKENS = 10  # short turns: the measure's shape is what is checked, not the prose


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from thoughtform.backends import create_backend

    b = create_backend("transformers", model="embedded-voices")
    yield b
    b.close()


def check_well_formed(scores: dict[int, dict[int, float]], c: Council) -> None:
    """Non-negative, each turn's row sums to at most 1, on earlier turns only."""
    spoken = [t.index for t in c.turns if t.voice is not None and t.source == "model"]
    assert sorted(scores) == spoken
    for j, row in scores.items():
        assert row and all(i < j for i in row), (j, row)
        assert all(v >= 0 for v in row.values()), row
        assert sum(row.values()) <= 1 + 1e-6, row
    # The last turn attends to every earlier turn it saw, and to some of them for real.
    last = scores[spoken[-1]]
    assert set(last) == {t.index for t in c.turns[:-1] if t.text}
    assert sum(last.values()) > 0


def test_attention_resonance_of_a_short_council(backend: Any) -> None:
    assert backend.capabilities.attention
    c = Council(
        SEED,
        MEMBERS,
        backend,
        "list",
        attention=True,
        sampling=Sampling(temperature=0.0, seed=0, max_tokens=TOKENS),
        alternatives=0,
    )
    c.say("Why is the sky blue?")
    list(c.run(3))
    assert [t.voice for t in c.turns] == [None, *MEMBERS]
    for t in c.turns[1:]:
        assert t.text and t.context  # where each earlier turn sits in its prompt
        assert [s[0] for s in t.context] == [e.index for e in c.turns[: t.index] if e.text]
        toks = c.trace.tokens[t.start : t.end]
        assert toks and all(x.attention is not None for x in toks)
    s = attention_scores(c.trace, c.turns)
    check_well_formed(s, c)
    assert council_scores(c, "attention") == s
    # A layer range is a well-formed measure too.
    check_well_formed(attention_scores(c.trace, c.turns, layers=(20, 30)), c)
    m = voice_matrix(c.turns, s)
    assert all(v is None or 0 <= v <= 1 for row in m.values for v in row)
    assert m.get("Pulse", "Echo") is not None and m.get("Echo", "Pulse") is None


def test_the_council_tab_shows_attention_on_transformers(backend: Any, tmp_path: Path) -> None:
    from thoughtform.ui.config import ServeConfig
    from thoughtform.ui.council_view import CouncilService
    from thoughtform.ui.service import Workbench

    svc = CouncilService(Workbench(ServeConfig(backend="transformers", db=str(tmp_path / "db"))))
    svc.wb.backend_for = lambda s: backend  # type: ignore[method-assign]  # the loaded model
    got = [json.loads(p) for p, _ in svc.start(MEMBERS, "list", 2, TOKENS, "Is it cold?", None,
                                                  "attention")]  # fmt: skip
    last = got[-1]
    assert last["state"] == "done" and last["shown"] == "attention", last["measure_note"]
    assert last["measure_note"] == "" and last["unit"] == "attention mass"
    assert [m["backend"] for m in last["members"]] == [
        f"transformers · {Path(backend.model_name).name}"
    ] * 3
    live = svc.get(last["id"], None)
    want = council_scores(live.council, "attention")
    check_well_formed(want, live.council)
    assert last["arcs"] and all(a["from"] < a["to"] and 0 < a["w"] <= 1 for a in last["arcs"])
    counts = last["matrix"]["counts"]
    assert sum(map(sum, counts)) == sum(len(r) for r in want.values())
