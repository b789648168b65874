"""The Council tab's resonance and member order, without a browser: the arcs and the chosen
measure in the snapshot, the one-line note on a backend that cannot give a measure, the
counterfactual scored only once a run is over, members in the order the page sends, and which
backend each member speaks through."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from council_scripted import ScriptedBackend, as_speaker

from thoughtform.backends.base import GenerationRequest
from thoughtform.resonance import arcs, echo_scores
from thoughtform.ui.config import ServeConfig
from thoughtform.ui.council_view import CouncilService
from thoughtform.ui.service import Workbench, WorkbenchError

FIX = Path(__file__).parent / "fixtures" / "council"
MEMBERS = ["Echo", "Doubt", "Pulse", "Shift"]


def make(tmp_path: Path) -> CouncilService:
    cfg = ServeConfig(backend="replay", replay=str(FIX / "hostile.txt"), db=str(tmp_path / "s.db"))
    return CouncilService(Workbench(cfg))


def snaps(gen: Any) -> list[dict[str, Any]]:
    return [json.loads(p) for p, _ in gen]


def test_snapshot_carries_the_echo_arcs_and_the_measure(tmp_path: Path) -> None:
    svc = make(tmp_path)
    last = snaps(svc.start(MEMBERS, "round-robin", 4, 96, "Is the sea here?", None))[-1]
    live = svc.get(last["id"], None)
    want = [a.to_dict() for a in arcs(echo_scores(live.council.turns))]
    assert last["arcs"] == want and want
    assert (last["measure"], last["shown"], last["unit"], last["measure_note"]) == (
        "echo", "echo", "share", ""
    )  # fmt: skip
    # Every arc goes from an earlier turn to a later one, above the threshold.
    assert all(a["from"] < a["to"] and a["w"] >= 0.05 for a in last["arcs"])
    assert {"to": 2, "from": 1} in [{"to": a["to"], "from": a["from"]} for a in last["arcs"]]
    # Which backend each member speaks through (text only).
    assert {m["backend"] for m in last["members"]} == {"replay"}


def test_a_measure_the_backend_cannot_give_says_so_and_shows_echo(tmp_path: Path) -> None:
    svc = make(tmp_path)
    *_, (_pl, cid) = svc.start(MEMBERS, "round-robin", 2, 96, "Is the sea here?", None)
    echo = json.loads(svc.open(cid, None))
    for measure, why in [
        ("attention", "attention: needs the transformers backend (this council runs on replay)"),
        ("counterfactual", "counterfactual: backend replay cannot score text"),
    ]:
        s = json.loads(svc.set_measure(cid, measure, None))
        assert s["measure"] == measure and s["shown"] == "echo"
        assert s["measure_note"].startswith(why) and s["measure_note"].endswith("showing echo")
        assert "\n" not in s["measure_note"]
        assert s["matrix"] == echo["matrix"] and s["arcs"] == echo["arcs"]
    with pytest.raises(WorkbenchError, match="unknown measure 'vibes'"):
        svc.set_measure(cid, "vibes", None)
    with pytest.raises(WorkbenchError, match="unknown measure"):
        list(svc.start(MEMBERS, "list", 1, 96, "x", None, measure="vibes"))
    # Started with a measure: kept on the council.
    last = snaps(svc.start(MEMBERS, "list", 1, 96, "x", None, measure="attention"))[-1]
    assert last["measure"] == "attention" and last["measure_note"].startswith("attention:")


def test_counterfactual_is_scored_once_the_run_is_over(tmp_path: Path) -> None:
    # Not replay (which plays a recording whole): a scripted backend that scores continuations.
    svc = CouncilService(Workbench(ServeConfig(backend="openai", db=str(tmp_path / "s.db"))))
    calls: list[int] = []

    def scores(req: GenerationRequest, texts: Sequence[str], prefix: str) -> list[float]:
        calls.append(len(req.messages))
        ctx = " ".join(m.content for m in req.messages)
        return [-(1.0 if "sea" in ctx else 3.0) * len(t.split()) for t in texts]

    backend = ScriptedBackend(as_speaker("the sea again"), scores=scores)
    svc.wb.backend_for = lambda s: backend  # type: ignore[method-assign]
    got = snaps(svc.start(MEMBERS, "list", 3, 96, "Is the sea here?", None, "counterfactual"))
    during, last = got[:-1], got[-1]
    # While the turns streamed nothing was scored (the backend was generating)...
    assert during and all(g["arcs"] == [] for g in during)
    assert any("scored when the council pauses or ends" in g["measure_note"] for g in during)
    # ...then every finished turn was, once.
    assert last["shown"] == "counterfactual" and last["unit"] == "nats/token"
    assert last["measure_note"] == ""
    # Turn 1 (Echo) is 2 nats/word more surprising without the user's "sea": the one arc.
    assert last["arcs"] == [{"to": 1, "from": 0, "w": 2.0}]
    n = len(calls)
    again = json.loads(svc.set_measure(last["id"], "counterfactual", None))
    assert again["arcs"] == last["arcs"] and len(calls) == n  # from the cache
    assert json.loads(svc.set_measure(last["id"], "echo", None))["shown"] == "echo"


def test_members_in_the_order_the_page_sends(tmp_path: Path) -> None:
    svc = make(tmp_path)
    order = json.loads(svc.order_value())
    assert order["kind"] == "order"
    rows = order["voices"]
    assert [r["name"] for r in rows][:4] == MEMBERS and [r["on"] for r in rows][:4] == [True] * 4
    assert not any(r["on"] for r in rows[4:])
    assert {r["backend"] for r in rows} == {"replay · hostile.txt"}
    names = svc.parse_members(json.dumps(["Pulse", "Echo", "Doubt"]))
    assert names == ["Pulse", "Echo", "Doubt"]
    assert svc.parse_members("Shift, Echo") == ["Shift", "Echo"]
    last = snaps(svc.start(names, "list", 3, 96, "Is the sea here?", None))[-1]
    assert [t["voice"] for t in last["turns"]] == [None, "Pulse", "Echo", "Doubt"]
    assert [m["name"] for m in last["members"]] == names
    for bad, why in [("[1, 2]", "not a list"), ("[oops", "not a list"), ("[]", "at least one")]:
        with pytest.raises(WorkbenchError, match=why):
            svc.parse_members(bad)
