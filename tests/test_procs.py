"""Servers started by tests and benchmarks die with the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def test_child_dies_when_parent_is_killed() -> None:
    parent = (
        "import subprocess, sys\n"
        "from thoughtform.procs import die_with_parent\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " preexec_fn=die_with_parent)\n"
        "print(c.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    child = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)  # a crash: no cleanup code runs in the parent
    p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"child {child} outlived its killed parent")
