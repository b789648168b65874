"""Child processes that never outlive the process that started them."""

from __future__ import annotations


def die_with_parent() -> None:
    """``preexec_fn`` for subprocesses: SIGTERM the child when its parent dies, even by a crash
    (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere), so servers started by tests or benchmarks
    are never left running."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
