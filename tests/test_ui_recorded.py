"""Sessions `thoughtform proxy` records into the same database: listed, filtered, shown live."""

from __future__ import annotations

import json
from pathlib import Path

from thoughtform.trace import TokenRecord
from thoughtform.ui.config import ServeConfig
from thoughtform.ui.service import Tab, Workbench
from thoughtform.ui.store import Store

FIX = Path(__file__).parent / "fixtures" / "ui"


def test_a_recorded_session_is_filtered_and_redrawn_as_the_proxy_writes(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    cfg = ServeConfig(backend="replay", replay=str(FIX / "voices.jsonl"), db=str(db))
    wb = Workbench(cfg)
    mine = wb.new_session("mine")
    # Another process (the proxy) writes into the same file through its own Store.
    proxy = Store(db)
    sid = proxy.create_session("proxy · hi", settings={"recorded": True, "source": "proxy"})
    proxy.add_message(sid, "user", "hi")
    reply = proxy.add_message(sid, "assistant", None, status="streaming")
    proxy.append_tokens(reply.id, [TokenRecord(index=0, text="[Echo]\n"), TokenRecord(1, "Hi")])

    every = [i for _, i in wb.session_choices()]
    only = [i for _, i in wb.session_choices(recorded_only=True)]
    assert set(every) == {mine.id, sid} and only == [sid]

    pl, tab = wb.reset_payload(sid)
    events = json.loads(pl)["ev"]
    # Still streaming in the proxy: drawn as streaming, not as a dead "interrupted" reply.
    assert not any(e[0] == "E" and e[1] == "interrupted" for e in events)
    first = wb.live_update(tab)
    assert first is not None  # the first look at a recorded session takes its version
    tab = first[1]
    assert wb.live_update(tab) is None  # nothing new
    proxy.append_tokens(reply.id, [TokenRecord(index=2, text=" there")])
    got = wb.live_update(tab)
    assert got is not None and "there" in got[0]
    proxy.finish_message(reply.id, "done", {"reason": "stop"})
    assert wb.live_update(got[1]) is not None
    # An ordinary session is not polled.
    _, t2 = wb.reset_payload(mine.id)
    assert wb.live_update(Tab(t2.sid, t2.known)) is None
    wb.close()
    proxy.close()
