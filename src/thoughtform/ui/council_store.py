"""Councils in the workbench's SQLite database: one row per council holding its trace JSONL.

The table lives beside the sessions tables and is created by :func:`migrate_councils` (its own
migration, separate from the sessions schema): ``councils(id, owner, title, created, updated,
trace)``. A council is saved whole after every turn; councils are small (a few KB a turn)."""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from ..trace import Trace, parse_trace_lines
from .store import Store, StoreError

_CID = re.compile(r"^c-[A-Za-z0-9_-]{1,40}$")

_DDL = """
CREATE TABLE IF NOT EXISTS councils(
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL DEFAULT '',
  title TEXT NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  trace TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS councils_by_owner ON councils(owner, updated);
"""


def valid_council_id(cid: object) -> bool:
    """Whether ``cid`` has the shape of a council id (ids arrive from the browser)."""
    return isinstance(cid, str) and _CID.match(cid) is not None


def new_council_id() -> str:
    """A fresh council id."""
    return "c-" + secrets.token_urlsafe(9)


def migrate_councils(con: sqlite3.Connection) -> None:
    """Create the councils table (and its index) if this database has none yet."""
    con.executescript(_DDL)


@dataclass(frozen=True)
class CouncilInfo:
    """A saved council's row, without its trace."""

    id: str
    title: str
    created: float
    updated: float


class CouncilStore:
    """Councils in the same database file as the sessions (through the sessions store's
    per-thread connections and write transactions)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        try:
            migrate_councils(store._conn())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{store.path}: cannot add the councils table: {e}") from None

    def save(self, cid: str, owner: str | None, title: str, trace: Trace) -> None:
        """Insert or replace a council (its owner never changes once saved)."""
        now = time.time()
        with self.store._tx() as con:
            row = con.execute("SELECT owner FROM councils WHERE id=?", (cid,)).fetchone()
            if row is not None and row[0] != (owner or ""):
                raise StoreError("no such council")
            con.execute(
                "INSERT INTO councils(id, owner, title, created, updated, trace) VALUES"
                " (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET title=excluded.title,"
                " updated=excluded.updated, trace=excluded.trace",
                (cid, owner or "", title, now, now, trace.to_jsonl()),
            )

    def list(self, owner: str | None) -> list[CouncilInfo]:
        """The councils of ``owner`` ('' or None: the shared ones), newest first."""
        rows = self.store._conn().execute(
            "SELECT id, title, created, updated FROM councils WHERE owner=? ORDER BY updated DESC",
            (owner or "",),
        )
        return [CouncilInfo(*r) for r in rows]

    def load(self, cid: str, owner: str | None) -> Trace | None:
        """A council's trace (None when missing or another owner's)."""
        if not valid_council_id(cid):
            return None
        row = (
            self.store._conn()
            .execute("SELECT trace FROM councils WHERE id=? AND owner=?", (cid, owner or ""))
            .fetchone()
        )
        if row is None:
            return None
        return parse_trace_lines(row[0], f"council {cid}", errors=[])

    def delete(self, cid: str, owner: str | None) -> bool:
        """Delete a council of ``owner``; whether one was deleted."""
        with self.store._tx() as con:
            cur = con.execute("DELETE FROM councils WHERE id=? AND owner=?", (cid, owner or ""))
            return cur.rowcount > 0
