"""Every proxied exchange as a workbench session, written while it streams.

One writer thread per process owns the only writing connection to the SQLite file (WAL mode;
the workbench's :class:`~thoughtform.ui.store.Store`), so requests never wait on the disk:
they queue operations and the writer applies them in order, token rows batched about every
``flush_s`` (like the workbench's own runs). Several proxy worker processes may share one file:
each write is a short ``BEGIN IMMEDIATE`` transaction and SQLite's busy timeout orders them.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trace import TokenRecord

SOURCE = "proxy"


@dataclass
class Exchange:
    """One recorded request/reply; ``sid`` and ``message_id`` are set by the writer."""

    title: str
    voice_set: dict[str, Any]
    settings: dict[str, Any]
    messages: list[tuple[str, str]]
    meta: dict[str, Any]
    owner: str = ""
    sid: str | None = None
    message_id: int | None = None
    failed: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


def title_for(messages: Sequence[tuple[str, str]], limit: int = 60) -> str:
    """A session title from the last user message: ``proxy · first words…``."""
    text = next((c for r, c in reversed(messages) if r == "user" and c.strip()), "")
    line = " ".join(text.split())
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return f"{SOURCE} · {line}" if line else f"{SOURCE} · (empty prompt)"


class Recorder:
    """Queues exchange writes for the process's writer thread."""

    def __init__(self, path: str | Path, flush_s: float = 0.1) -> None:
        from ..ui.store import Store

        self.path = Path(path)
        self.flush_s = flush_s
        self._q: queue.Queue[tuple[str, Exchange | None, Any]] = queue.Queue()
        # Opened here so a bad path fails at start-up; the writer thread gets its own
        # connection from the store (one per thread) and is the only one that writes.
        self.store = Store(self.path)
        self._thread = threading.Thread(target=self._main, name="tf-proxy-writer", daemon=True)
        self._closed = False
        self._thread.start()

    # -- the request side ------------------------------------------------------------------

    def begin(
        self,
        messages: Sequence[tuple[str, str]],
        voice_set: dict[str, Any],
        settings: dict[str, Any],
        meta: dict[str, Any],
        owner: str = "",
    ) -> Exchange:
        """Start recording an exchange: a session (``owner``'s, '' = shared) with the client's
        messages and a reply marked ``streaming``."""
        ex = Exchange(
            title=title_for(messages),
            voice_set=voice_set,
            settings={"recorded": True, "source": SOURCE, **settings},
            messages=list(messages),
            meta={"source": SOURCE, **meta},
            owner=owner,
        )
        self._q.put(("begin", ex, None))
        return ex

    def tokens(self, ex: Exchange, records: Sequence[TokenRecord]) -> None:
        """Tokens whose voice is known (written with the next batch)."""
        if records:
            self._q.put(("tokens", ex, list(records)))

    def finish(self, ex: Exchange, status: str, finish: dict[str, Any], text: str) -> None:
        """How the reply ended (``done``, ``cancelled``, ``error``) with its final text."""
        self._q.put(("finish", ex, (status, finish, text)))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer and close the database."""
        if self._closed:
            return
        self._closed = True
        self._q.put(("stop", None, None))
        self._thread.join(timeout)
        self.store.close()

    # -- the writer thread -----------------------------------------------------------------

    def _main(self) -> None:
        pending: dict[int, tuple[Exchange, list[TokenRecord]]] = {}
        last = time.monotonic()
        stop = False
        while not stop:
            timeout = None if not pending else max(0.0, last + self.flush_s - time.monotonic())
            try:
                op, ex, arg = self._q.get(timeout=timeout)
            except queue.Empty:
                op, ex, arg = "tick", None, None
            if op == "stop":
                stop = True
            elif op == "begin" and ex is not None:
                self._begin(ex)
            elif op == "tokens" and ex is not None:
                got = pending.setdefault(id(ex), (ex, []))
                got[1].extend(arg)
            elif op == "finish" and ex is not None:
                batch = pending.pop(id(ex), None)
                if batch is not None:
                    self._write_tokens(ex, batch[1])
                self._finish(ex, *arg)
            if stop or time.monotonic() - last >= self.flush_s:
                for ex2, recs in pending.values():
                    self._write_tokens(ex2, recs)
                pending.clear()
                last = time.monotonic()

    def _fail(self, ex: Exchange, what: str, e: Exception) -> None:
        if ex.failed is None:
            ex.failed = f"{what}: {e}"
            print(f"thoughtform proxy: recording failed ({what}): {e}", file=sys.stderr)

    def _begin(self, ex: Exchange) -> None:
        try:
            sid = self.store.create_session(
                title=ex.title, voice_set=ex.voice_set, settings=ex.settings, owner=ex.owner
            )
            ex.sid = sid
            for role, content in ex.messages:
                self.store.add_message(sid, role, content)
            msg = self.store.add_message(sid, "assistant", None, status="streaming", meta=ex.meta)
            ex.message_id = msg.id
        except Exception as e:  # the reply still goes to the client
            self._fail(ex, "session", e)
        finally:
            ex.started.set()

    def _write_tokens(self, ex: Exchange, recs: list[TokenRecord]) -> None:
        if ex.message_id is None or not recs:
            return
        try:
            self.store.append_tokens(ex.message_id, recs)
        except Exception as e:
            self._fail(ex, "tokens", e)

    def _finish(self, ex: Exchange, status: str, finish: dict[str, Any], text: str) -> None:
        try:
            if ex.message_id is not None:
                self.store.finish_message(ex.message_id, status, finish, text)
        except Exception as e:
            self._fail(ex, "finish", e)
        finally:
            ex.finished.set()
