"""Sessions database: WAL, transactions, token batches, two writers, a writer killed mid-reply."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from thoughtform.trace import Alternative, TokenRecord
from thoughtform.ui.store import Store, StoreError, valid_session_id


def tok(i: int, text: str = "w ") -> TokenRecord:
    return TokenRecord(index=i, text=text, logprob=-0.5, top=[Alternative(text, -0.5)], entropy=1.0)


def test_wal_and_round_trip(tmp_path: Path) -> None:
    st = Store(tmp_path / "s.db")
    (mode,) = sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"
    sid = st.create_session("first", settings={"temperature": 0.3})
    assert valid_session_id(sid)
    u = st.add_message(sid, "user", "hello [Doubt] there")
    a = st.add_message(sid, "assistant", None, status="streaming")
    assert (u.seq, a.seq) == (0, 1)
    st.append_tokens(a.id, [tok(0, "[Echo]"), tok(1, " hi")])
    st.finish_message(a.id, "done", {"reason": "stop"}, "[Echo] hi")
    msgs = st.messages(sid)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].text == "[Echo] hi"
    assert msgs[1].tokens[1].top[0].text == " hi"
    assert msgs[1].finish == {"reason": "stop"}
    info = st.get_session(sid)
    assert info is not None and info.settings == {"temperature": 0.3} and info.messages == 2
    st.update_session(sid, title="renamed", voice_set={"voices": ["A"]})
    info = st.get_session(sid)
    assert info is not None and info.title == "renamed" and info.voice_set == {"voices": ["A"]}
    assert st.delete_session(sid)
    assert st.get_session(sid) is None
    # Cascade: no orphan tokens or messages.
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("SELECT COUNT(*) FROM tokens").fetchone() == (0,)
    assert con.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


def test_bad_ids_and_missing_sessions(tmp_path: Path) -> None:
    st = Store(tmp_path / "s.db")
    assert st.get_session("../../etc/passwd") is None
    assert not valid_session_id("a b")
    assert not valid_session_id("x" * 65)
    with pytest.raises(StoreError):
        st.add_message("nope", "user", "x")
    with pytest.raises(StoreError):
        st.update_session("nope", title="x")


def test_not_a_database(tmp_path: Path) -> None:
    p = tmp_path / "junk.db"
    p.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match=r"not a thoughtform sessions database|cannot open"):
        Store(p)


def test_two_writers_one_session_keep_order(tmp_path: Path) -> None:
    """Two tabs (threads, separate connections) appending to one session: no lost or duplicate
    sequence numbers, every token row lands under the right message."""
    st = Store(tmp_path / "s.db")
    sid = st.create_session()
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for k in range(25):
                m = st.add_message(sid, "assistant", None, status="streaming", meta={"tag": tag})
                st.append_tokens(m.id, [tok(i, f"{tag}{k}.{i} ") for i in range(4)])
                st.finish_message(m.id, "done", {"reason": "stop"})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(t,)) for t in "AB"]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    msgs = st.messages(sid)
    assert [m.seq for m in msgs] == list(range(50))
    for m in msgs:
        tag = m.meta["tag"]
        assert [t.text.split(".")[0][0] for t in m.tokens] == [tag] * 4
        assert [t.index for t in m.tokens] == [0, 1, 2, 3]


def test_killed_writer_keeps_flushed_batches(tmp_path: Path) -> None:
    """A process killed with SIGKILL mid-reply: every committed batch is readable afterwards and
    the reply stays marked as streaming (shown as interrupted)."""
    db = tmp_path / "s.db"
    st = Store(db)
    sid = st.create_session()
    code = textwrap.dedent(
        f"""
        import sys, time
        from thoughtform.ui.store import Store
        from thoughtform.trace import TokenRecord
        st = Store({str(db)!r})
        m = st.add_message({sid!r}, "assistant", None, status="streaming")
        i = 0
        while True:
            st.append_tokens(m.id, [TokenRecord(index=i + k, text="t ") for k in range(5)])
            i += 5
            if i == 50:
                print("ready", flush=True)
            time.sleep(0.01)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    msgs = Store(db).messages(sid)
    assert len(msgs) == 1 and msgs[0].status == "streaming"
    n = len(msgs[0].tokens)
    assert n >= 50 and n % 5 == 0  # whole batches only
    assert [t.index for t in msgs[0].tokens] == list(range(n))


V1_DDL = """
CREATE TABLE sessions(id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL,
  updated REAL NOT NULL, voice_set TEXT, settings TEXT NOT NULL DEFAULT '{}');
CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, seq INTEGER NOT NULL,
  role TEXT NOT NULL, content TEXT, status TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}',
  finish TEXT, created REAL NOT NULL, UNIQUE(session_id, seq));
CREATE TABLE tokens(message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY(message_id, idx)) WITHOUT ROWID;
INSERT INTO sessions VALUES('old-session','from version 1',1.0,2.0,NULL,'{"max_tokens":9}');
INSERT INTO messages(session_id,seq,role,content,status,created)
  VALUES('old-session',0,'user','kept',"done",1.5);
PRAGMA user_version=1;
"""


def test_a_version_1_database_opens_and_gains_owners(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(V1_DDL)
    con.close()
    st = Store(db)
    info = st.get_session("old-session")
    assert info is not None and info.owner == "" and info.settings == {"max_tokens": 9}
    assert [m.content for m in st.messages("old-session")] == ["kept"]
    (version,) = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()
    assert version == 2
    # Old sessions were everybody's: they stay in the unscoped list, in nobody's own list.
    assert [s.id for s in st.list_sessions()] == ["old-session"]
    assert st.list_sessions(owner="ann") == []
    st.close()
    # Opening again (already migrated) changes nothing.
    st = Store(db)
    assert st.get_session("old-session") is not None
    st.close()


def test_sessions_are_scoped_by_owner(tmp_path: Path) -> None:
    st = Store(tmp_path / "s.db")
    a = st.create_session("ann's", owner="ann")
    b = st.create_session("bob's", owner="bob")
    shared = st.create_session("shared")
    assert [s.id for s in st.list_sessions(owner="ann")] == [a]
    assert {s.id for s in st.list_sessions()} == {a, b, shared}
    assert st.get_session(a, owner="bob") is None
    assert st.get_session(a, owner="ann") is not None
    with pytest.raises(StoreError):
        st.update_session(a, title="x", owner="bob")
    assert not st.delete_session(a, owner="bob")
    assert st.get_session(a) is not None and st.get_session(a).title == "ann's"  # type: ignore[union-attr]
    st.set_owner(shared, "bob")
    assert {s.id for s in st.list_sessions(owner="bob")} == {b, shared}
    assert st.delete_session(a, owner="ann")
    with pytest.raises(StoreError):
        st.set_owner("missing", "ann")
