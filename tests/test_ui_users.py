"""Several people on one workbench: with a login every lookup is scoped to its user, without
one every tab shares; the model's queue goes round the users and tells each their place."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.config import ServeConfig
from thoughtform.ui.fairqueue import FairQueue
from thoughtform.ui.service import Tab, Workbench, WorkbenchError
from thoughtform.ui.store import StoreError
from thoughtform.voices import PRESETS

FIX = Path(__file__).parent / "fixtures" / "ui"
USERS = [("ann", "pw-a"), ("bob", "pw-b")]


def make_wb(tmp_path: Path, auth: Any = USERS, rate: float = 0.0, replay: str = "voices.jsonl"):
    cfg = ServeConfig(
        backend="replay",
        replay=str(FIX / replay),
        db=str(tmp_path / "s.db"),
        replay_rate=rate,
        auth=auth,
    )
    return Workbench(cfg)


def run_reply(wb: Workbench, tab: Tab, text: str, user: str | None) -> list[dict[str, Any]]:
    return [json.loads(pl) for pl, _ in wb.send(tab, text, user)]


def test_each_user_sees_only_their_own_sessions(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, replay="attention.jsonl")
    _, ann_tab = wb.reset_payload(None, "ann")
    pls = run_reply(wb, ann_tab, "ann's inner dialogue", "ann")
    run_id = next(p["run"] for p in pls if p["run"])
    ann_sid = ann_tab.sid or ""
    # Bob's first visit makes his own session; Ann's is not in his list.
    _, bob_tab = wb.reset_payload(None, "bob")
    assert bob_tab.sid and bob_tab.sid != ann_sid
    assert [sid for _, sid in wb.session_choices("bob")] == [bob_tab.sid]
    assert [sid for _, sid in wb.session_choices("ann")] == [ann_sid]
    # Asking for Ann's session by id gives Bob his own instead.
    pl, tab = wb.reset_payload(ann_sid, "bob")
    assert tab.sid == bob_tab.sid and "ann's inner dialogue" not in pl
    assert wb.session_info(ann_sid, "bob") is None
    assert wb.session_info(ann_sid, "ann") is not None
    # Streams and attention of Ann's reply: empty for Bob, full for Ann.
    assert wb.run_events(run_id, 0, 5, "bob") == []
    assert len(wb.run_events(run_id, 0, 5, "ann")) == 5
    assert wb.attention(ann_sid, 10, "bob") is None
    assert wb.attention(ann_sid, 10, "ann") is not None
    # Changing Ann's session as Bob fails like a missing session, and changes nothing.
    with pytest.raises(StoreError):
        wb.rename(ann_sid, "taken", "bob")
    with pytest.raises(StoreError):
        wb.save_settings(ann_sid, {"temperature": 0.1}, "bob")
    with pytest.raises(StoreError):
        wb.set_voices(ann_sid, PRESETS["think"], "bob")
    assert not wb.stop(ann_sid, "bob")
    wb.delete(ann_sid, "bob")
    info = wb.session_info(ann_sid, "ann")
    assert info is not None and info.title != "taken" and info.messages == 2
    assert info.owner == "ann" and info.voice_set is None
    # Sending into Ann's session id as Bob lands in Bob's own session.
    run_reply(wb, Tab(ann_sid, 2), "bob writes", "bob")
    assert wb.store.message_count(ann_sid) == 2
    assert wb.store.message_count(bob_tab.sid) == 2
    # A login is needed for anything at all.
    with pytest.raises(WorkbenchError, match="log in"):
        wb.session_choices(None)
    with pytest.raises(WorkbenchError, match="log in"):
        wb.new_session()
    wb.delete(ann_sid, "ann")
    assert wb.session_info(ann_sid, "ann") is None
    wb.close()


def test_without_login_every_tab_shares(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, auth=None)
    _, tab = wb.reset_payload(None)
    run_reply(wb, tab, "one person, two tabs", None)
    # Another tab (any or no user name) opens the same session and may change it.
    _, other = wb.reset_payload(None, None)
    assert other.sid == tab.sid
    assert [sid for _, sid in wb.session_choices()] == [tab.sid]
    wb.rename(tab.sid or "", "shared", None)
    assert wb.session_info(tab.sid, None).title == "shared"  # type: ignore[union-attr]
    assert wb.store.get_session(tab.sid or "").owner == ""  # type: ignore[union-attr]
    wb.close()


def test_imported_sessions_belong_to_the_importer(tmp_path: Path) -> None:
    from thoughtform.ui.export import import_file

    wb = make_wb(tmp_path)
    sid, _ = import_file(wb.store, FIX / "voices.jsonl", wb.default_settings())
    wb.adopt(sid, "bob")
    assert [s for _, s in wb.session_choices("bob")] == [sid]
    assert wb.session_choices("ann") == []
    wb.close()


def test_fair_queue_goes_round_the_users() -> None:
    q = FairQueue()
    a1 = q.join("ann")  # runs at once
    a2, a3 = q.join("ann"), q.join("ann")
    b1 = q.join("bob")
    c1 = q.join("cy")
    assert q.wait(a1, None, 0) is None
    # Bob's and Cy's first replies go before Ann's second and third.
    assert [q.ahead(t) for t in (a2, b1, c1, a3)] == [1, 2, 3, 4]
    order = []
    running = a1
    for _ in range(4):
        q.leave(running)
        running = next(t for t in (a2, a3, b1, c1) if t not in order and q.running(t))
        order.append(running)
    assert order == [a2, b1, c1, a3]
    # A user who sends again while others wait goes to the back of the round.
    b2 = q.join("bob")
    a4 = q.join("ann")
    assert q.ahead(b2) == 1 and q.ahead(a4) == 2
    q.leave(b2)  # left while waiting (the page closed)
    assert q.ahead(a4) == 1 and q.snapshot() == (1, {"ann": 1})
    q.leave(a3)
    assert q.running(a4)


def test_fair_queue_wait_wakes_on_a_change() -> None:
    q = FairQueue()
    a = q.join("ann")
    b = q.join("bob")
    assert q.wait(b, None, 0) == 1
    threading.Timer(0.2, q.leave, (a,)).start()
    t0 = time.monotonic()
    assert q.wait(b, 1, 5.0) is None  # woken when Ann's reply ends, not after 5 s
    assert time.monotonic() - t0 < 4.0


def test_a_lost_waiter_cannot_hold_the_model() -> None:
    q = FairQueue(stale_s=0.3)
    a = q.join("ann")
    b = q.join("bob")  # Bob's page and handler vanish: he never polls again
    c = q.join("cy")
    assert q.wait(c, None, 0) == 2
    q.leave(a)  # the model goes to Bob, who does not come for it
    assert q.running(b)
    time.sleep(0.4)
    assert q.wait(c, 2, 1.0) is None  # Cy's poll hands Bob's stale slot on
    with pytest.raises(LookupError):
        q.wait(b, None, 0)
    # A waiter that polls keeps its place however long it waits.
    d = q.join("dee")
    for _ in range(4):
        assert q.wait(d, 1, 0.1) == 1
    q.leave(c)
    assert q.wait(d, 1, 0) is None


def test_the_model_is_free_when_the_reply_ends(tmp_path: Path) -> None:
    """The slot goes back when the run ends, not when its page's generator is closed."""
    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None, "ann")
    gen = wb.send(tab, "quick", "ann")
    first = json.loads(next(gen)[0])
    run = wb.runs[first["run"]]
    run.join(10)
    assert run.done
    deadline = time.monotonic() + 5
    while wb.queue.snapshot()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wb.queue.snapshot() == (0, {})  # while the generator is still suspended
    gen.close()
    assert wb.queue.snapshot() == (0, {})
    wb.close()


def test_a_waiting_user_sees_their_place(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, rate=40.0)  # ~70 tokens: Ann's reply takes about 2 s
    _, ann_tab = wb.reset_payload(None, "ann")
    _, bob_tab = wb.reset_payload(None, "bob")
    started = threading.Event()
    ann_done: list[float] = []

    def ann() -> None:
        for _ in wb.send(ann_tab, "long one", "ann"):
            started.set()
        ann_done.append(time.monotonic())

    t = threading.Thread(target=ann)
    t.start()
    assert started.wait(10)
    waits: list[str] = []
    bob_first_run: float | None = None
    bob_tabs = []
    for pl, tab in wb.send(bob_tab, "my turn?", "bob"):
        p = json.loads(pl)
        bob_tabs.append(tab)
        lines = [e[1] for e in p["ev"] if e[0] == "T" and str(e[1]).startswith("waiting:")]
        waits += lines
        if p["run"] and bob_first_run is None:
            bob_first_run = time.monotonic()
            # The reply that waited starts with a reset: the queue line is gone.
            assert p["reset"] == 1 and not lines
        if lines:
            # The waiting prompt is shown but not stored yet; it is Bob's, in Bob's session.
            assert p["sid"] == bob_tab.sid and ["T", "my turn?", None] in p["ev"]
            assert wb.store.message_count(bob_tab.sid or "") == 0
    t.join()
    assert waits and set(waits) == {"waiting: 1 ahead"}
    assert bob_first_run is not None and ann_done and bob_first_run >= ann_done[0] - 0.05
    assert bob_tabs[-1] == Tab(bob_tab.sid, 2)
    assert wb.store.message_count(bob_tab.sid or "") == 2
    assert wb.queue.snapshot() == (0, {})
    wb.close()


def test_stop_while_waiting_leaves_the_queue(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, rate=20.0)
    _, ann_tab = wb.reset_payload(None, "ann")
    _, bob_tab = wb.reset_payload(None, "bob")
    started = threading.Event()
    gen_a = wb.send(ann_tab, "long one", "ann")
    next(gen_a)
    started.set()
    gen_b = wb.send(bob_tab, "queued", "bob")
    first = json.loads(next(gen_b)[0])
    assert any(e[0] == "T" and e[1] == "waiting: 1 ahead" for e in first["ev"])
    assert not wb.stop(bob_tab.sid, "ann")  # not Ann's to stop
    assert wb.stop(bob_tab.sid, "bob")
    rest = [json.loads(pl) for pl, _ in gen_b]
    assert rest and rest[-1]["reset"] == 1
    assert not any(e[0] == "T" and str(e[1]).startswith("waiting") for e in rest[-1]["ev"])
    assert wb.store.message_count(bob_tab.sid or "") == 0  # nothing was stored
    assert wb.queue.snapshot() == (1, {})  # only Ann's reply, still running
    gen_a.close()
    assert wb.queue.snapshot() == (0, {})
    wb.close()
