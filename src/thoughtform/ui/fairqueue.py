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
    """Round-robin over users for ``slots`` concurrent replies (thread-safe)."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
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
            self._waiting.setdefault(user, deque()).append(t)
            self._dispatch()
            return t

    def _dispatch(self) -> None:
        granted = False
        while len(self._running) < self.slots and self._waiting:
            user, tickets = next(iter(self._waiting.items()))
            self._running.add(tickets.popleft())
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
        ``timeout`` seconds pass; returns None once it runs, else how many are ahead."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if ticket in self._running:
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
            user = self._user.pop(ticket, None)
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
            self._dispatch()
            self._cond.notify_all()

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(replies running, waiting replies per user), for display and tests."""
        with self._cond:
            return len(self._running), {u: len(q) for u, q in self._waiting.items()}
