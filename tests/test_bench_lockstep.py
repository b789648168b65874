"""The backend bench's lockstep pairing: two streams stepped in turn, each item's time its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from thoughtform.bench.backend import lockstep


def _stream(name: str, n: int, log: list[str]) -> Iterator[dict[str, Any]]:
    for i in range(n):
        log.append(f"{name}{i}")
        yield {"tokens": 1}
    log.append(f"{name}-end")
    yield {"tokens": 0}  # a closing item that holds no token


def test_lockstep_alternates_and_counts_each_streams_tokens() -> None:
    log: list[str] = []
    a, b = lockstep(_stream("a", 4, log), _stream("b", 2, log), lambda it: it["tokens"])
    # The first item of each (the prompt's) is taken apart, then one of each in turn; the
    # shorter stream ends and the longer goes on alone.
    assert log == ["a0", "b0", "a1", "b1", "a2", "b-end", "a3", "a-end"]
    assert a > 0 and b > 0
