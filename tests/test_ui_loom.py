"""The loom in the workbench without a browser: the branches table (and its migration), branch
replies kept out of the conversation, export/import of a reply's tree, the family and compare
answers, forks resolved from the page's alternatives, and branching a stored reply on the real
embedded voices model."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.trace import Alternative, TokenRecord, Trace, load_trace
from thoughtform.ui.config import ServeConfig
from thoughtform.ui.export import import_file, reply_trace, session_markdown
from thoughtform.ui.loom_view import (
    branch_message,
    compare_messages,
    families,
    family,
    loom_action,
    resolve_fork,
)
from thoughtform.ui.service import Workbench, WorkbenchError
from thoughtform.ui.store import Store, StoreError
from thoughtform.voices import resolve_voice_set

VS = resolve_voice_set("seed")
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def toks(pieces: list[tuple[str, int]], alts: dict[int, list[Alternative]] | None = None) -> list:
    return [
        TokenRecord(
            index=i, text=t, token_id=tid, logprob=-0.5, top=(alts or {}).get(i, []), entropy=1.0
        )
        for i, (t, tid) in enumerate(pieces)
    ]


PARENT = [("[Echo]\n", 1), ("The sea", 2), (" is blue", 3), (".\n\n", 4), ("[Doubt]\n", 5)]
PARENT += [("Is it", 6), (" blue", 7), ("?", 8)]
CHILD = [*PARENT[:4], ("[Pulse]\n", 9), ("A beat", 10), (HOSTILE, 11)]


def reply(st: Store, sid: str, pieces: list[tuple[str, int]], **kw: Any) -> int:
    m = st.add_message(sid, "assistant", None, status="streaming", **kw)
    tt = toks(pieces, {4: [Alternative("[Doubt]\n", -0.2, 5), Alternative("[Pulse]\n", -1.6, 9)]})
    st.append_tokens(m.id, tt)
    st.finish_message(m.id, "done", {"reason": "stop"}, "".join(t.text for t in tt))
    return m.id


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Store, str, int, int]:
    st = Store(tmp_path / "s.db")
    sid = st.create_session("loom")
    st.add_message(sid, "user", "Is the sea blue?")
    root = reply(st, sid, PARENT)
    kid = reply(st, sid, CHILD)
    st.add_branch(sid, root, {"at": 4, "token_id": 9}, {"seed": 2}, kid)
    return st, sid, root, kid


def test_branch_rows_and_replies_outside_the_conversation(tree: Any, tmp_path: Path) -> None:
    st, sid, root, kid = tree
    # The conversation (every view, the next request) sees the user message and the root only.
    assert [m.id for m in st.messages(sid)][1:] == [root]
    assert st.message_count(sid) == 2
    assert {m.id for m in st.messages(sid, branches=True)} >= {root, kid}
    got = {m.id: m for m in st.messages(sid, branches=True)}[kid]
    assert got.tokens[-1].text == HOSTILE and got.tokens[4].token_id == 9
    (row,) = st.branches(sid)
    assert (row.parent_id, row.fork_at, row.child_id) == (root, 4, kid)
    assert row.fork == {"at": 4, "token_id": 9} and row.settings == {"seed": 2}
    # A branch joins two messages of the same session only.
    other = st.create_session("other")
    with pytest.raises(StoreError):
        st.add_branch(other, root, {"at": 0, "voice": "Doubt"}, {}, kid)
    # Deleting the session takes its branches with it.
    assert st.delete_session(sid)
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("SELECT COUNT(*) FROM branches").fetchone() == (0,)


def test_a_database_from_before_the_loom_opens_and_gains_the_table(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE sessions(id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL,
          updated REAL NOT NULL, voice_set TEXT, settings TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
          seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT, status TEXT NOT NULL,
          meta TEXT NOT NULL DEFAULT '{}', finish TEXT, created REAL NOT NULL,
          UNIQUE(session_id, seq));
        INSERT INTO sessions VALUES('old1','old',1,1,NULL,'{}');
        INSERT INTO messages(session_id,seq,role,content,status,created)
          VALUES('old1',0,'user','hi','done',1),('old1',1,'assistant','[Echo] hello','done',1);
        """
    )
    con.commit()
    con.close()
    st = Store(db)
    assert [m.text for m in st.messages("old1")] == ["hi", "[Echo] hello"]
    assert st.branches("old1") == []
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert "branches" in tables
    st.close()
    assert [m.role for m in Store(db).messages("old1")] == ["user", "assistant"]  # again: no-op


def test_export_carries_the_tree_and_import_brings_it_back(tree: Any, tmp_path: Path) -> None:
    st, sid, root, kid = tree
    # A branch of the branch: the tree has depth two.
    grand = reply(st, sid, [*CHILD[:5], ("Drum", 12)])
    st.add_branch(sid, kid, {"at": 5, "text": "Drum"}, {"seed": 3}, grand)
    info = st.get_session(sid)
    assert info is not None
    tr = reply_trace(info, st.messages(sid), 0, VS, store=st)
    assert tr is not None
    tree_meta = tr.meta["branches"]
    assert [b["child"] for b in tree_meta] == [kid, grand]
    assert [b["parent"] for b in tree_meta] == [root, kid]
    assert tree_meta[0]["reply"]["tokens"][-1]["text"] == HOSTILE
    assert [t.text for t in tr.tokens] == [t for t, _ in PARENT]  # the root is the trace
    md = session_markdown(info, st.messages(sid), VS, store=st)
    assert f"### Branch of message {root} at token 4 (token id: 9)" in md
    assert f"### Branch of message {kid} at token 5 (text: Drum)" in md
    assert "~~~~text\nA beat" + HOSTILE in md  # model text only inside fences
    out = tmp_path / "r.jsonl"
    tr.save(out)
    assert load_trace(out).meta["branches"][1]["fork"] == {"at": 5, "text": "Drum"}
    new_sid, warnings = import_file(st, out, {})
    assert warnings == []
    main = st.messages(new_sid)
    assert [m.role for m in main] == ["user", "assistant"]
    rows = st.branches(new_sid)
    assert len(rows) == 2 and rows[0].parent_id == main[1].id
    assert rows[1].parent_id == rows[0].child_id  # the depth survives the id remapping
    by_id = {m.id: m for m in st.messages(new_sid, branches=True)}
    assert by_id[rows[0].child_id].text == "".join(t for t, _ in CHILD)
    assert [t.token_id for t in by_id[rows[1].child_id].tokens] == [1, 2, 3, 4, 9, 12]


def wb_on(st: Store, tmp_path: Path) -> Workbench:
    fixture = Path(__file__).parent / "fixtures" / "ui" / "voices.jsonl"
    cfg = ServeConfig(db=str(tmp_path / "s.db"), backend="replay", replay=str(fixture))
    return Workbench(cfg, store=st)


def test_family_compare_and_the_page_calls(tree: Any, tmp_path: Path) -> None:
    st, sid, root, kid = tree
    wb = wb_on(st, tmp_path)
    fam = family(wb, sid, kid)  # asked from a branch: the whole family from its root
    assert fam["root"] == root
    assert [(m["id"], m["depth"], m["parent"]) for m in fam["members"]] == [
        (root, 0, None),
        (kid, 1, root),
    ]
    assert fam["members"][1]["label"] == "@4 token 9"
    voices = [s[0] for s in fam["members"][1]["segments"]]
    assert voices == ["Echo", "Pulse"] and fam["members"][1]["segments"][1][2].endswith(HOSTILE)
    assert families(wb, sid) == {str(root): 2}
    res = compare_messages(wb, sid, root, kid)
    c = res["compare"]
    assert c["fork"] == 4 and c["appeared"] == ["Pulse"] and c["vanished"] == ["Doubt"]
    assert c["b"]["forked_token_p_under_a"] == pytest.approx(math.exp(-1.6))
    assert res["a"]["fork_char"] == res["b"]["fork_char"] == len("[Echo]\nThe sea is blue.\n\n")
    assert res["prefix"] == "[Echo]\nThe sea is blue.\n\n"
    assert loom_action(wb, ["families", sid], None) == {"ok": True, "families": {str(root): 2}}
    assert loom_action(wb, ["compare", sid, root, 99999], None)["ok"] is False
    assert loom_action(wb, ["nope"], None) == {"ok": False, "error": "bad loom request"}
    assert loom_action(wb, ["family", "no-such", root], None)["error"] == "no such session"
    # Branching needs a backend that continues from token ids: the replay one refuses.
    got = loom_action(wb, ["branch", sid, root, {"at": 4, "alt": "[Pulse]\n"}, 1], None)
    assert got["ok"] is False and "llamacpp" in got["error"]


def test_forks_from_the_page() -> None:
    parent = Trace(tokens=toks(PARENT, {4: [Alternative("[Pulse]\n", -1.6, 9)]}))
    assert resolve_fork(parent, {"at": 4, "alt": "[Pulse]\n"}).token_id == 9
    assert resolve_fork(parent, {"at": 4, "voice": "Doubt"}).voice == "Doubt"
    # An OpenAI-compatible server reports no ids: its alternative is forced as text.
    no_ids = Trace(tokens=toks(PARENT, {4: [Alternative("[Pulse]\n", -1.6, None)]}))
    f = resolve_fork(no_ids, {"at": 4, "alt": "[Pulse]\n"})
    assert f.text == "[Pulse]\n" and f.token_id is None
    for bad in ({"at": 99, "voice": "Doubt"}, {"at": 4, "alt": "nope"}, {"at": "x"}, {"at": 1}):
        with pytest.raises(WorkbenchError):
            resolve_fork(parent, bad)


# ------------------------------------------------------------------- on the embedded model


@pytest.fixture(scope="module")
def model_wb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workbench, str, int]]:
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("ui-loom")
    wb = Workbench(ServeConfig(db=str(d / "s.db"), backend="llamacpp", model="embedded-voices"))
    sid = wb.store.create_session("loom")
    wb.save_settings(
        sid, {**wb.default_settings(), "model": "embedded-voices", "max_tokens": 32, "seed": 1}
    )
    from thoughtform.ui.service import Tab

    for _ in wb.send(Tab(sid, 0), "Is the sea blue?"):
        pass
    (m,) = [m for m in wb.store.messages(sid) if m.role == "assistant"]
    yield wb, sid, m.id
    wb.close()


@pytest.mark.model
def test_branch_a_stored_reply_from_an_alternative(model_wb: Any) -> None:
    wb, sid, mid = model_wb
    parent = {m.id: m for m in wb.store.messages(sid)}[mid]
    at = min(6, len(parent.tokens) - 1)
    alt = parent.tokens[at].top[1]
    ids = branch_message(wb, sid, mid, {"at": at, "alt": alt.text}, n=2)
    assert len(ids) == 2
    kids = {m.id: m for m in wb.store.messages(sid, branches=True)}
    for i in ids:
        k = kids[i]
        assert [t.token_id for t in k.tokens[:at]] == [t.token_id for t in parent.tokens[:at]]
        assert k.tokens[at].token_id == alt.token_id and k.tokens[at].forced
        assert k.status == "done" and len(k.tokens) > at + 1
    # Two seeds: two different continuations; the conversation still has one reply.
    assert kids[ids[0]].text != kids[ids[1]].text
    assert [m.id for m in wb.store.messages(sid) if m.role == "assistant"] == [mid]
    rows = wb.store.branches(sid)
    assert [r.settings["seed"] for r in rows] == [2, 3]
    # Another voice at the fork: its marker opens there.
    (v,) = branch_message(wb, sid, mid, {"at": at, "voice": "Doubt"})
    k = {m.id: m for m in wb.store.messages(sid, branches=True)}[v]
    assert "[Doubt]" in "".join(t.text for t in k.tokens[at : at + 8])
    assert families(wb, sid) == {str(mid): 4}
