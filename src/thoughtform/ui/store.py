"""Sessions in SQLite (WAL): sessions, their messages, and every generated token as it streams."""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trace import TokenRecord

# 1: sessions, messages, tokens. 2: sessions.owner (the user a session belongs to; '' = shared).
# (The loom's branches table has its own migration, _migrate_branches: it only adds a table.)
SCHEMA_VERSION = 2
_SID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_DDL = """
CREATE TABLE IF NOT EXISTS sessions(
  id TEXT PRIMARY KEY,
  title TEXT NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  voice_set TEXT,
  settings TEXT NOT NULL DEFAULT '{}',
  owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS messages(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,
  role TEXT NOT NULL,
  content TEXT,
  status TEXT NOT NULL,
  meta TEXT NOT NULL DEFAULT '{}',
  finish TEXT,
  created REAL NOT NULL,
  UNIQUE(session_id, seq)
);
CREATE TABLE IF NOT EXISTS tokens(
  message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  data TEXT NOT NULL,
  PRIMARY KEY(message_id, idx)
) WITHOUT ROWID;
"""


# The loom (thoughtform.loom, ui/loom_view.py): each row is one branch of a reply, whose own
# reply (child_id) is an ordinary assistant message of the session kept out of the conversation.
_BRANCH_DDL = """
CREATE TABLE IF NOT EXISTS branches(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
  parent_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  fork_at INTEGER NOT NULL,
  fork TEXT NOT NULL,
  settings TEXT NOT NULL DEFAULT '{}',
  child_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
  created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS branches_by_parent ON branches(parent_id, id);
"""
_NOT_BRANCH = "id NOT IN (SELECT child_id FROM branches)"


def _migrate_branches(con: sqlite3.Connection) -> None:
    """Add the branches table to a database written before the loom (sessions stay as they
    were: no message is a branch)."""
    with _tx_on(con):
        for stmt in _BRANCH_DDL.split(";"):
            if stmt.strip():
                con.execute(stmt)


@contextmanager
def _tx_on(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@dataclass
class BranchRow:
    """One branch: the reply it leaves (parent message), where and what it forces (a
    ``Fork.to_dict``), the settings it ran with and the message holding its reply."""

    id: int
    session: str
    parent_id: int
    fork_at: int
    fork: dict[str, Any]
    settings: dict[str, Any]
    child_id: int
    created: float

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (export, the page)."""
        return {
            "id": self.id,
            "parent": self.parent_id,
            "fork_at": self.fork_at,
            "fork": self.fork,
            "settings": self.settings,
            "child": self.child_id,
            "created": self.created,
        }


class StoreError(RuntimeError):
    """The sessions database cannot be opened or a session does not exist."""


def valid_session_id(sid: object) -> bool:
    """Whether ``sid`` has the shape of a session id (ids arrive from URLs and the browser)."""
    return isinstance(sid, str) and _SID.match(sid) is not None


@dataclass
class SessionInfo:
    """One session's row: id, title, times, its voice set (a mapping) and settings."""

    id: str
    title: str
    created: float
    updated: float
    voice_set: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    messages: int = 0
    owner: str = ""  # the logged-in user it belongs to ('' without auth: shared by every tab)


@dataclass
class StoredMessage:
    """One message: user text, or a reply with its tokens; ``status`` says how it ended."""

    id: int
    seq: int
    role: str
    content: str | None
    status: str
    meta: dict[str, Any]
    finish: dict[str, Any] | None
    created: float
    tokens: list[TokenRecord] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The message text: its tokens joined when it has tokens, else its content."""
        if self.tokens:
            return "".join(t.text for t in self.tokens)
        return self.content or ""

    @property
    def interrupted(self) -> bool:
        """True when the reply did not end normally (stopped, failed, or the server died)."""
        return self.status not in ("done",)


def _loads(s: str | None, default: Any) -> Any:
    if not s:
        return default
    try:
        return json.loads(s)
    except ValueError:
        return default


def _dumps(x: Any) -> str:
    return json.dumps(x, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class Store:
    """A sessions database; safe to share between threads (one connection per thread)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self._busy = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path.parent}: cannot create: {e.strerror}") from None
        con = self._conn()
        # executescript commits on its own, so the DDL runs outside our transaction helper.
        try:
            con.executescript(_DDL)
            self._migrate(con)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a thoughtform sessions database: {e}") from None

    def _migrate(self, con: sqlite3.Connection) -> None:
        """Bring a database written by an older version up to this schema (in place)."""
        with self._tx(con):
            cols = {r[1] for r in con.execute("PRAGMA table_info(sessions)")}
            if "owner" not in cols:  # version 1: every session was shared
                con.execute("ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            con.execute("CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated)")
            (version,) = con.execute("PRAGMA user_version").fetchone()
            if int(version) < SCHEMA_VERSION:
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        _migrate_branches(con)

    # -- connections ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is not None:
            return con
        try:
            con = sqlite3.connect(
                self.path, timeout=self._busy / 1000, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA busy_timeout={int(self._busy)}")
            con.execute("PRAGMA foreign_keys=ON")
            # NORMAL in WAL mode: a commit survives a killed process (only an OS crash can lose
            # the last transactions), and each token batch stays cheap.
            con.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open sessions database: {e}") from None
        self._local.con = con
        with self._lock:
            self._all.append(con)
        return con

    @contextmanager
    def _tx(self, con: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE) so two writers never deadlock."""
        con = con or self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._lock:
            cons, self._all = self._all, []
        for con in cons:
            try:
                con.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # -- sessions ------------------------------------------------------------------------

    def create_session(
        self,
        title: str = "New session",
        voice_set: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        owner: str = "",
    ) -> str:
        """Create an empty session (belonging to ``owner``) and return its id."""
        sid = secrets.token_urlsafe(9)
        now = time.time()
        with self._tx() as con:
            con.execute(
                "INSERT INTO sessions(id,title,created,updated,voice_set,settings,owner) "
                "VALUES(?,?,?,?,?,?,?)",
                (
                    sid,
                    title,
                    now,
                    now,
                    _dumps(voice_set) if voice_set else None,
                    _dumps(settings or {}),
                    owner,
                ),
            )
        return sid

    def set_owner(self, sid: str, owner: str) -> None:
        """Give a session to ``owner`` (a session imported for a logged-in user)."""
        with self._tx() as con:
            cur = con.execute("UPDATE sessions SET owner=? WHERE id=?", (owner, sid))
            if cur.rowcount == 0:
                raise StoreError(f"no session {sid!r}")

    def _info(self, row: tuple[Any, ...]) -> SessionInfo:
        return SessionInfo(
            id=row[0],
            title=row[1],
            created=row[2],
            updated=row[3],
            voice_set=_loads(row[4], None),
            settings=_loads(row[5], {}),
            owner=row[6],
            messages=row[7],
        )

    _SELECT = (
        "SELECT s.id,s.title,s.created,s.updated,s.voice_set,s.settings,s.owner,"
        "(SELECT COUNT(*) FROM messages m WHERE m.session_id=s.id) FROM sessions s "
    )

    def list_sessions(self, owner: str | None = None) -> list[SessionInfo]:
        """Sessions, most recently used first: all of them, or only ``owner``'s."""
        order = "ORDER BY s.updated DESC, s.created DESC"
        con = self._conn()
        if owner is None:
            rows = con.execute(self._SELECT + order)
        else:
            rows = con.execute(self._SELECT + "WHERE s.owner=? " + order, (owner,))
        return [self._info(r) for r in rows]

    def get_session(self, sid: str, owner: str | None = None) -> SessionInfo | None:
        """One session (when ``owner`` is given, only if it is theirs), or None."""
        if not valid_session_id(sid):
            return None
        con = self._conn()
        if owner is None:
            row = con.execute(self._SELECT + "WHERE s.id=?", (sid,)).fetchone()
        else:
            q = self._SELECT + "WHERE s.id=? AND s.owner=?"
            row = con.execute(q, (sid, owner)).fetchone()
        return self._info(row) if row else None

    def update_session(
        self,
        sid: str,
        title: str | None = None,
        voice_set: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> None:
        """Change a session's title, voice set or settings (and mark it used now); with
        ``owner``, only a session of theirs (another's raises like a missing one)."""
        sets = ["updated=?"]
        args: list[Any] = [time.time()]
        if title is not None:
            sets.append("title=?")
            args.append(title)
        if voice_set is not None:
            sets.append("voice_set=?")
            args.append(_dumps(voice_set))
        if settings is not None:
            sets.append("settings=?")
            args.append(_dumps(settings))
        where, wargs = ("id=?", [sid]) if owner is None else ("id=? AND owner=?", [sid, owner])
        with self._tx() as con:
            cur = con.execute(
                f"UPDATE sessions SET {','.join(sets)} WHERE {where}", (*args, *wargs)
            )
            if cur.rowcount == 0:
                raise StoreError(f"no session {sid!r}")

    def delete_session(self, sid: str, owner: str | None = None) -> bool:
        """Delete a session with its messages and tokens (with ``owner``, only a session of
        theirs); False when there was none."""
        with self._tx() as con:
            if owner is None:
                cur = con.execute("DELETE FROM sessions WHERE id=?", (sid,))
            else:
                cur = con.execute("DELETE FROM sessions WHERE id=? AND owner=?", (sid, owner))
        return cur.rowcount > 0

    # -- messages ------------------------------------------------------------------------

    def add_message(
        self,
        sid: str,
        role: str,
        content: str | None,
        status: str = "done",
        meta: dict[str, Any] | None = None,
        finish: dict[str, Any] | None = None,
    ) -> StoredMessage:
        """Append a message to a session (its sequence number taken inside the transaction)."""
        now = time.time()
        with self._tx() as con:
            if con.execute("SELECT 1 FROM sessions WHERE id=?", (sid,)).fetchone() is None:
                raise StoreError(f"no session {sid!r}")
            (seq,) = con.execute(
                "SELECT COALESCE(MAX(seq),-1)+1 FROM messages WHERE session_id=?", (sid,)
            ).fetchone()
            cur = con.execute(
                "INSERT INTO messages(session_id,seq,role,content,status,meta,finish,created) "
                "VALUES(?,?,?,?,?,?,?,?)",
                (
                    sid,
                    seq,
                    role,
                    content,
                    status,
                    _dumps(meta or {}),
                    _dumps(finish) if finish else None,
                    now,
                ),
            )
            con.execute("UPDATE sessions SET updated=? WHERE id=?", (now, sid))
        return StoredMessage(
            id=int(cur.lastrowid or 0),
            seq=seq,
            role=role,
            content=content,
            status=status,
            meta=meta or {},
            finish=finish,
            created=now,
        )

    def append_tokens(self, message_id: int, tokens: Iterable[TokenRecord]) -> int:
        """Write a batch of token rows in one transaction; returns how many."""
        rows = [(message_id, t.index, _dumps(t.to_dict())) for t in tokens]
        if not rows:
            return 0
        with self._tx() as con:
            con.executemany(
                "INSERT OR REPLACE INTO tokens(message_id,idx,data) VALUES(?,?,?)", rows
            )
        return len(rows)

    def finish_message(
        self,
        message_id: int,
        status: str,
        finish: dict[str, Any] | None,
        content: str | None = None,
    ) -> None:
        """Record how a reply ended (and optionally its final text)."""
        with self._tx() as con:
            if content is None:
                con.execute(
                    "UPDATE messages SET status=?, finish=? WHERE id=?",
                    (status, _dumps(finish) if finish else None, message_id),
                )
            else:
                con.execute(
                    "UPDATE messages SET status=?, finish=?, content=? WHERE id=?",
                    (status, _dumps(finish) if finish else None, content, message_id),
                )

    def session_version(self, sid: str) -> tuple[int, int, str]:
        """What a viewer needs to notice another process writing to a session: messages,
        token rows and the last message's status (one query; the proxy writes while it streams)."""
        row = (
            self._conn()
            .execute(
                "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM messages WHERE session_id=?", (sid,)
            )
            .fetchone()
        )
        n, last = int(row[0]), int(row[1])
        (toks,) = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM tokens WHERE message_id IN"
                " (SELECT id FROM messages WHERE session_id=?)",
                (sid,),
            )
            .fetchone()
        )
        st = self._conn().execute("SELECT status FROM messages WHERE id=?", (last,)).fetchone()
        return n, int(toks), str(st[0]) if st else ""

    def message_count(self, sid: str) -> int:
        """How many messages a session has."""
        (n,) = (
            self._conn()
            .execute("SELECT COUNT(*) FROM messages WHERE session_id=? AND " + _NOT_BRANCH, (sid,))
            .fetchone()
        )
        return int(n)

    def messages(
        self, sid: str, tokens: bool = True, branches: bool = False
    ) -> list[StoredMessage]:
        """A session's messages in order, with their tokens (read in one snapshot); the
        loom's branch replies only with ``branches`` (they are not part of the conversation)."""
        con = self._conn()
        con.execute("BEGIN")  # one read snapshot: a reply streaming meanwhile stays consistent
        try:
            rows = con.execute(
                "SELECT id,seq,role,content,status,meta,finish,created FROM messages "
                "WHERE session_id=? "
                + ("" if branches else "AND " + _NOT_BRANCH)
                + " ORDER BY seq",
                (sid,),
            ).fetchall()
            out = [
                StoredMessage(
                    id=r[0],
                    seq=r[1],
                    role=r[2],
                    content=r[3],
                    status=r[4],
                    meta=_loads(r[5], {}),
                    finish=_loads(r[6], None),
                    created=r[7],
                )
                for r in rows
            ]
            if tokens and out:
                by_id = {m.id: m for m in out}
                q = (
                    "SELECT t.message_id,t.data FROM tokens t JOIN messages m ON m.id=t.message_id "
                    "WHERE m.session_id=? ORDER BY t.message_id,t.idx"
                )
                for mid, data in con.execute(q, (sid,)):
                    if mid not in by_id:
                        continue  # a branch reply's tokens (not asked for)
                    rec = _loads(data, None)
                    if not isinstance(rec, dict):
                        continue
                    try:
                        tok = TokenRecord.from_dict(rec)
                    except (KeyError, TypeError, ValueError):
                        continue
                    msg = by_id[mid]
                    # A gap (lost batch) would shift every later index: keep tokens contiguous.
                    tok.index = len(msg.tokens)
                    msg.tokens.append(tok)
        finally:
            con.execute("COMMIT")
        return out

    # -- branches (the loom) -------------------------------------------------------------

    def add_branch(
        self,
        sid: str,
        parent_id: int,
        fork: dict[str, Any],
        settings: dict[str, Any],
        child_id: int,
    ) -> BranchRow:
        """Record that message ``child_id`` is a branch of ``parent_id`` at ``fork``."""
        now = time.time()
        at = int(fork.get("at") or 0)
        with self._tx() as con:
            for mid in (parent_id, child_id):
                row = con.execute("SELECT session_id FROM messages WHERE id=?", (mid,)).fetchone()
                if row is None or row[0] != sid:
                    raise StoreError(f"no message {mid} in session {sid!r}")
            cur = con.execute(
                "INSERT INTO branches(session_id,parent_id,fork_at,fork,settings,child_id,created)"
                " VALUES(?,?,?,?,?,?,?)",
                (sid, parent_id, at, _dumps(fork), _dumps(settings), child_id, now),
            )
        return BranchRow(int(cur.lastrowid or 0), sid, parent_id, at, fork, settings, child_id, now)

    def branches(self, sid: str) -> list[BranchRow]:
        """Every branch of a session, oldest first."""
        rows = self._conn().execute(
            "SELECT id,session_id,parent_id,fork_at,fork,settings,child_id,created FROM branches"
            " WHERE session_id=? ORDER BY id",
            (sid,),
        )
        return [
            BranchRow(r[0], r[1], r[2], r[3], _loads(r[4], {}), _loads(r[5], {}), r[6], r[7])
            for r in rows
        ]
