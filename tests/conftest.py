"""Shared test setup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# llama.cpp's OpenMP workers spin-wait; with the test runner, a browser and a server sharing two
# cores that collapses throughput. The backend sets the same default; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module, launched as the workbench's tests launch it
    (:func:`thoughtform.ui.harness.launch`: Debian's, ``--no-sandbox --disable-gpu``)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from thoughtform.ui.harness import launch

    with sync_api.sync_playwright() as pw:
        br = launch(pw)
        yield br
        br.close()
