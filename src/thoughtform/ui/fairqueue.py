"""The model's queue, fair between users: one reply per user per round, and each waiting
reply can tell how many replies will run before it.

Gradio's own queue is first come, first served: one person who sends five prompts from five tabs
makes everybody else wait for all five. Here the replies wait by user, and the model goes round
the users in turn (a user's second reply waits behind every other user's first).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque


class FairQueue:
    """Round-robin over users for ``slots`` concurrent replies (thread-safe).

    A waiter polls :meth:`wait`; one that has not polled for ``stale_s`` seconds (its page and
    its handler are gone without a word) loses its place, and a slot granted to it is handed
    on, so a lost waiter can never hold the model."""

    def __init__(self, slots: int = 1, stale_s: float = 15.0) -> None:
        self.slots = slots
        self.stale_s = stale_s
        self._seen: dict[int, float] = {}  # ticket -> when its waiter last polled
        self._claimed: set[int] = set()  # running tickets whose waiter saw the grant
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        # Users with waiting replies in the order they get the model next; each user's
        # replies wait in the order they were sent.
        self._waiting: OrderedDict[str, deque[int]] = OrderedDict()
        self._user: dict[int, str] = {}
        self._running: set[int] = set()

    def join(self, user: str) -> int:
        """Queue a reply for ``user``; returns its ticket (give it back with :meth:`leave`)."""
        with self._cond:
            t = next(self._ids)
            self._user[t] = user
            self._seen[t] = time.monotonic()
            self._waiting.setdefault(user, deque()).append(t)
            self._dispatch()
            return t

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for t in [t for t, seen in self._seen.items() if now - seen > self.stale_s]:
            if t not in self._claimed:
                self._forget(t)

    def _forget(self, ticket: int) -> None:
        user = self._user.pop(ticket, None)
        self._seen.pop(ticket, None)
        self._claimed.discard(ticket)
        if ticket in self._running:
            self._running.discard(ticket)
        elif user is not None and user in self._waiting:
            q = self._waiting[user]
            try:
                q.remove(ticket)
            except ValueError:
                pass
            if not q:
                del self._waiting[user]

    def _dispatch(self) -> None:
        self._drop_stale()
        granted = False
        while len(self._running) < self.slots and self._waiting:
            user, tickets = next(iter(self._waiting.items()))
            t = tickets.popleft()
            self._running.add(t)
            self._seen[t] = time.monotonic()  # the waiter has stale_s to see the grant
            # This user had their turn: to the back of the round (or out, with nothing left).
            del self._waiting[user]
            if tickets:
                self._waiting[user] = tickets
            granted = True
        if granted:
            self._cond.notify_all()

    def ahead(self, ticket: int) -> int:
        """How many replies run before this one: those running now plus those that get the
        model first in the round-robin order (0 once it runs)."""
        with self._cond:
            return self._ahead(ticket)

    def _ahead(self, ticket: int) -> int:
        if ticket in self._running or ticket not in self._user:
            return 0
        user = self._user[ticket]
        mine = self._waiting.get(user, deque())
        k = list(mine).index(ticket)  # this user's replies that go first
        users = list(self._waiting)
        p = users.index(user)
        n = len(self._running) + k
        for i, u in enumerate(users):
            if u != user:
                # Round r takes each user's r-th reply, in the order of ``users``.
                n += min(len(self._waiting[u]), k + (1 if i < p else 0))
        return n

    def wait(self, ticket: int, last: int | None, timeout: float) -> int | None:
        """Wait until this ticket gets the model, its place changes from ``last``, or
        ``timeout`` seconds pass; returns None once it runs, else how many are ahead.
        Raises LookupError for a ticket that left or lost its place."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if ticket not in self._user:
                    raise LookupError(f"ticket {ticket} is not in the queue")
                self._seen[ticket] = time.monotonic()
                self._dispatch()
                if ticket in self._running:
                    self._claimed.add(ticket)
                    self._seen.pop(ticket, None)  # running: it ends with leave()
                    return None
                n = self._ahead(ticket)
                left = deadline - time.monotonic()
                if n != last or left <= 0:
                    return n
                self._cond.wait(left)

    def running(self, ticket: int) -> bool:
        """Whether the ticket has the model now."""
        with self._cond:
            return ticket in self._running

    def leave(self, ticket: int) -> None:
        """The reply ended or its page went away: free its place (or its slot)."""
        with self._cond:
            self._forget(ticket)
            self._dispatch()
            self._cond.notify_all()

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(replies running, waiting replies per user), for display and tests."""
        with self._cond:
            return len(self._running), {u: len(q) for u, q in self._waiting.items()}
