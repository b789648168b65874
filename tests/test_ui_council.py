"""The workbench's Council tab, without a browser: CouncilService on the replay backend (start,
pause, resume, stop, the user's words, mute, speak next, saving per user, export)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from thoughtform.trace import load_trace
from thoughtform.ui.config import ServeConfig
from thoughtform.ui.council_view import CouncilService, council_markdown
from thoughtform.ui.service import Workbench, WorkbenchError

FIX = Path(__file__).parent / "fixtures" / "council"
MEMBERS = ["Echo", "Doubt", "Pulse", "Shift"]
PARTS = {
    "Echo": 'The sea <img src=x onerror="window.__pwned=1"> is here, you said.',
    "Doubt": "Is it? </div><script>window.__pwned=2</script> Who said the sea?",
    "Pulse": 'Salt & "breath" \' on the lips <b>now</b>.',
    "Shift": "From under the water, the sea is a ceiling: <style>*{display:none}</style>",
}


def make(tmp_path: Path, rate: float = 0.0, auth: Any = None) -> CouncilService:
    cfg = ServeConfig(
        backend="replay",
        replay=str(FIX / "hostile.txt"),
        db=str(tmp_path / "s.db"),
        replay_rate=rate,
        auth=auth,
    )
    return CouncilService(Workbench(cfg))


def snaps(gen: Any) -> list[dict[str, Any]]:
    return [json.loads(p) for p, _ in gen]


def test_start_streams_snapshots_and_saves(tmp_path: Path) -> None:
    svc = make(tmp_path)
    got = snaps(svc.start(MEMBERS, "round-robin", 4, 96, "Is the sea here?", None))
    last = got[-1]
    assert last["state"] == "done" and last["kind"] == "council"
    assert [t["voice"] for t in last["turns"]] == [None, *MEMBERS]
    assert [t["text"] for t in last["turns"][1:]] == [PARTS[m] for m in MEMBERS]
    assert [m["name"] for m in last["members"]] == MEMBERS
    assert all(m["color"].startswith("#") for m in last["members"])
    # The echo matrix: rows and columns the user then the members; Doubt takes up Echo's words.
    assert last["matrix"]["labels"] == ["(user)", *MEMBERS]
    assert last["matrix"]["values"][2][1] > 0
    assert got[0]["state"] == "running"
    # Saved: listed for this user, and a fresh service reads it back from the database.
    (title, cid), *_ = svc.choices(None)
    assert title == "Council: Is the sea here?" and cid == last["id"]
    again = CouncilService(Workbench(svc.wb.config))
    back = json.loads(again.open(cid, None))
    assert [t["text"] for t in back["turns"]] == [t["text"] for t in last["turns"]]
    # It goes on where it stopped (round-robin: Echo again).
    more = snaps(again.resume(cid, 1, None))
    assert more[-1]["turns"][-1]["voice"] == "Echo"


def test_pause_after_the_turn_then_resume(tmp_path: Path) -> None:
    svc = make(tmp_path)
    states = []
    cid = None
    for pl, c in svc.start(MEMBERS, "round-robin", 4, 96, "hi", None):
        s = json.loads(pl)
        states.append(s["state"])
        cid = c
        if len(s["turns"]) == 2 and s["turns"][1]["finish"] and "pausing" not in states:
            assert json.loads(svc.pause(c, None))["state"] == "pausing"
            states.append("pausing")
    last = json.loads(svc.open(cid, None))
    assert last["state"] == "paused" and len(last["turns"]) == 2
    assert last["turns"][1]["finish"] == "cut"  # the turn in progress finished
    rest = snaps(svc.resume(cid, 3, None))
    assert [t["voice"] for t in rest[-1]["turns"]] == [None, *MEMBERS]
    assert rest[-1]["state"] == "done"


def test_stop_keeps_the_partial_turn_marked(tmp_path: Path) -> None:
    svc = make(tmp_path, rate=40.0)  # 40 pieces a second: a turn takes a while
    cid = None
    for pl, c in svc.start(MEMBERS, "round-robin", 4, 96, "hi", None):
        s = json.loads(pl)
        cid = c
        if len(s["turns"]) == 2 and s["turns"][1]["text"] and not s["turns"][1]["finish"]:
            svc.stop(c, None)
    last = json.loads(svc.open(cid, None))
    assert last["state"] == "stopped"
    t = last["turns"][1]
    assert t["finish"] == "cancelled" and t["text"] and PARTS["Echo"].startswith(t["text"])
    # Saved so: a fresh service reads the interrupted turn back.
    again = CouncilService(Workbench(svc.wb.config))
    assert json.loads(again.open(cid, None))["turns"][1]["finish"] == "cancelled"


def test_user_words_mute_and_speak_next(tmp_path: Path) -> None:
    svc = make(tmp_path)
    *_, (_pl, cid) = svc.start(MEMBERS, "round-robin", 1, 96, "hi", None)
    s = json.loads(svc.say(cid, "I am the sea.", "Doubt", None))
    assert s["turns"][-1] == {
        "i": 2, "voice": "Doubt", "text": "I am the sea.", "by": "user", "policy": "round-robin",
        "source": "user", "probs": {}, "finish": "stop",
    }  # fmt: skip
    s = json.loads(svc.say(cid, "And I am me.", None, None))
    assert s["turns"][-1]["voice"] is None
    s = json.loads(svc.set_muted(cid, ["Doubt", "Pulse"], None))
    assert [m["muted"] for m in s["members"]] == [False, True, True, False]
    got = snaps(svc.resume(cid, 1, None))
    assert got[-1]["turns"][-1]["voice"] == "Shift"  # Doubt and Pulse are muted
    got = snaps(svc.speak_next(cid, "Echo", None))
    assert got[-1]["turns"][-1]["voice"] == "Echo" and got[-1]["turns"][-1]["by"] == "forced"
    with pytest.raises(WorkbenchError, match="muted"):
        list(svc.speak_next(cid, "Doubt", None))
    with pytest.raises(WorkbenchError, match="write something"):
        svc.say(cid, "  ", None, None)
    with pytest.raises(WorkbenchError, match="no council open"):
        svc.say(None, "x", None, None)


def test_say_while_running_joins_after_the_turn(tmp_path: Path) -> None:
    svc = make(tmp_path, rate=60.0)
    said = threading.Event()
    cid = None
    for pl, c in svc.start(MEMBERS, "round-robin", 2, 96, "hi", None):
        s = json.loads(pl)
        cid = c
        if not said.is_set() and len(s["turns"]) == 2:
            s2 = json.loads(svc.say(c, "wait for me", None, None))
            assert s2["note"] == "your words join after this turn"
            said.set()
    turns = json.loads(svc.open(cid, None))["turns"]
    assert [(t["voice"], t["source"]) for t in turns] == [
        (None, "user"),
        ("Echo", "model"),
        (None, "user"),
        ("Doubt", "model"),
    ]


def test_manual_waits_for_a_pick(tmp_path: Path) -> None:
    svc = make(tmp_path)
    got = snaps(svc.start(MEMBERS, "manual", 4, 96, "hi", None))
    assert got[-1]["state"] == "idle" and got[-1]["note"] == "pick who speaks next"
    assert len(got[-1]["turns"]) == 1
    got = snaps(svc.speak_next(got[-1]["id"], "Pulse", None))
    assert got[-1]["turns"][-1]["voice"] == "Pulse"


def test_bad_input(tmp_path: Path) -> None:
    svc = make(tmp_path)
    with pytest.raises(WorkbenchError, match="write what you say"):
        list(svc.start(MEMBERS, "round-robin", 4, 96, " ", None))
    with pytest.raises(WorkbenchError, match="unknown voice 'Nobody'"):
        list(svc.start(["Echo", "Nobody"], "round-robin", 4, 96, "x", None))
    with pytest.raises(WorkbenchError, match="at least one member"):
        list(svc.start([], "round-robin", 4, 96, "x", None))
    with pytest.raises(WorkbenchError, match="no such council"):
        svc.open("c-doesnotexist", None)
    with pytest.raises(WorkbenchError, match="no council open"):
        svc.open("../../etc/passwd", None)


def test_councils_belong_to_their_user(tmp_path: Path) -> None:
    svc = make(tmp_path, auth=[("ann", "a"), ("bob", "b")])
    *_, (_pl, cid) = svc.start(MEMBERS, "list", 1, 96, "mine", "ann")
    assert [c for _, c in svc.choices("ann")] == [cid]
    assert svc.choices("bob") == []
    for f in (svc.open, svc.pause, svc.stop):
        with pytest.raises(WorkbenchError, match="no such council"):
            f(cid, "bob")
    with pytest.raises(WorkbenchError, match="no such council"):
        svc.say(cid, "hijack", None, "bob")
    with pytest.raises(WorkbenchError, match="log in"):
        svc.choices(None)
    # Also after a restart (from the database, not the live registry).
    again = CouncilService(Workbench(svc.wb.config))
    with pytest.raises(WorkbenchError, match="no such council"):
        again.open(cid, "bob")
    assert json.loads(again.open(cid, "ann"))["id"] == cid


def test_export_jsonl_markdown_html(tmp_path: Path) -> None:
    svc = make(tmp_path)
    *_, (_pl, cid) = svc.start(MEMBERS, "round-robin", 4, 96, "Is the sea here?", None)
    trace = load_trace(svc.export(cid, "Trace (JSONL)", None))
    assert trace.meta["kind"] == "council" and len(trace.turns) == 5
    assert {t.turn for t in trace.tokens} == {1, 2, 3, 4}
    md = svc.export(cid, "Markdown", None).read_text(encoding="utf-8")
    assert "**Doubt** _(round-robin)_" in md and PARTS["Pulse"] in md
    html = svc.export(cid, "HTML report", None).read_text(encoding="utf-8")
    assert "<script>window.__pwned" not in html and "&lt;script&gt;window.__pwned" in html
    assert 'data-voice="Shift"' in html


def test_council_markdown_marks_how_each_speaker_was_chosen() -> None:
    from thoughtform.council import Turn

    md = council_markdown(
        "T",
        [
            Turn(0, None, "hi", finish="stop"),
            Turn(1, "Doubt", "why?", by="model", probs={"Doubt": 0.7, "Echo": 0.3}),
        ],
    )
    assert "**You**" in md
    assert "**Doubt** _(chosen by the model)_ — Doubt 0.70, Echo 0.30 _(interrupted)_" in md
