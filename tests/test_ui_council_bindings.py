"""The Council tab's per-voice bindings, without a browser: the session's voice set names each
member's backend (here: replay recordings inside ``serve --replay DIR``), the member list shows
it, the council runs each member on it, a restored council opens it again, and an opened
council's member list is that council's members in its order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.config import ServeConfig
from thoughtform.ui.council_view import CouncilService
from thoughtform.ui.service import Workbench, WorkbenchError
from thoughtform.voices import PRESETS, voice_set_from_dict

FIX = Path(__file__).parent / "fixtures" / "council"
HOSTILE_FILE = "<img src=x onerror=window.__pwned=3>.txt"
SEA_DOUBT = "Is the sea blue, or is it the sky in it?"
HOSTILE_ECHO = 'The sea <img src=x onerror="window.__pwned=1"> is here, you said.'


def bound_set(pulse_model: str = HOSTILE_FILE) -> dict[str, Any]:
    """The seed voices, Doubt on the sea recording, Pulse on the hostile-named copy."""
    d = PRESETS["seed"].to_dict()
    for v in d["voices"]:
        if v["name"] == "Doubt":
            v.update(backend="replay", model="sea.txt")
        if v["name"] == "Pulse":
            v.update(backend="replay", model=pulse_model)
    return d


def replay_dir(tmp_path: Path) -> Path:
    d = tmp_path / "replays"
    d.mkdir()
    shutil.copy(FIX / "hostile.txt", d / "0-hostile.txt")  # first: the shared default
    shutil.copy(FIX / "sea.txt", d / "sea.txt")
    shutil.copy(FIX / "sea.txt", d / HOSTILE_FILE)
    return d


def make(tmp_path: Path) -> tuple[CouncilService, str]:
    cfg = ServeConfig(backend="replay", replay=str(replay_dir(tmp_path)), db=str(tmp_path / "s.db"))
    wb = Workbench(cfg)
    sid = wb.store.create_session("bound", voice_set=bound_set())
    return CouncilService(wb), sid


def rows(order: str) -> list[tuple[str, bool, str]]:
    return [(r["name"], r["on"], r["backend"]) for r in json.loads(order)["voices"]]


def test_member_list_shows_the_sessions_bindings(tmp_path: Path) -> None:
    svc, sid = make(tmp_path)
    got = rows(svc.order_value(None, sid))
    assert got[:4] == [
        ("Echo", True, "replay · replays"),
        ("Doubt", True, "replay · sea.txt"),
        ("Pulse", True, f"replay · {HOSTILE_FILE}"),
        ("Shift", True, "replay · replays"),
    ]
    # Without a session: the server's voice set, no bindings.
    assert {b for _, _, b in rows(svc.order_value())} == {"replay · replays"}
    # What the list has ticked is kept, in its order.
    kept = rows(svc.order_value(None, sid, ticked=["Pulse", "Echo", "Nobody"]))
    assert [(n, on) for n, on, _ in kept[:3]] == [
        ("Pulse", True),
        ("Echo", True),
        ("Resonance", False),
    ]


def test_a_council_runs_members_on_their_bindings_and_restores_them(tmp_path: Path) -> None:
    svc, sid = make(tmp_path)
    members = ["Echo", "Doubt", "Pulse"]
    snaps = [json.loads(p) for p, _ in svc.start(members, "list", 3, 96, "Sea?", None, sid=sid)]
    last = snaps[-1]
    texts = {t["voice"]: t["text"] for t in last["turns"][1:]}
    assert texts["Echo"] == HOSTILE_ECHO  # the shared recording
    assert texts["Doubt"] == SEA_DOUBT  # its own recording
    assert texts["Pulse"] == "Salt on the lips."  # the same recording under a hostile name
    live = svc.get(last["id"], None)
    c = live.council
    assert c.backend_for("Doubt") is not c.backend_for("Echo")
    assert c.backend_for("Pulse") is not c.backend_for("Doubt")  # two files: two backends
    saved = {v["name"]: v for v in c.trace.meta["voice_set"]["voices"]}
    assert (saved["Doubt"]["backend"], saved["Doubt"]["model"]) == ("replay", "sea.txt")
    # A fresh service restores the council from the database with its bindings.
    again = CouncilService(Workbench(svc.wb.config))
    back = again.get(last["id"], None).council
    assert back.backend_for("Doubt") is not back.backend_for("Echo")
    assert [t.text for t in back.turns] == [t.text for t in c.turns]
    # Opened, the member list is the council's members in its order, each on its backend.
    opened = rows(again.order_value(live=again.get(last["id"], None)))
    assert [(n, on) for n, on, _ in opened[:4]] == [
        ("Echo", True),
        ("Doubt", True),
        ("Pulse", True),
        ("Resonance", False),
    ]
    assert again.members_value(again.order_value(live=again.get(last["id"], None))) == json.dumps(
        members
    )


def test_a_binding_the_workbench_cannot_open_is_one_line(tmp_path: Path) -> None:
    svc, _ = make(tmp_path)
    sid = svc.wb.store.create_session("bad", voice_set=bound_set(pulse_model="../../etc/passwd"))
    with pytest.raises(WorkbenchError) as e:
        list(svc.start(["Echo", "Pulse"], "list", 1, 96, "Sea?", None, sid=sid))
    msg = str(e.value)
    assert msg.startswith("voice Pulse (backend: replay): no recording") and "\n" not in msg
    # An adapter has no workbench setting yet: said, not silently dropped.
    d = bound_set()
    d["voices"][0].update(backend="llamacpp", adapter="x.gguf")
    assert voice_set_from_dict(d).voices[0].adapter == "x.gguf"
    sid = svc.wb.store.create_session("adapter", voice_set=d)
    with pytest.raises(WorkbenchError, match=r"^voice Echo \(backend: llamacpp\): adapter: "):
        list(svc.start(["Echo"], "list", 1, 96, "Sea?", None, sid=sid))
