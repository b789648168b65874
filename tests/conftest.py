"""Shared test setup."""

from __future__ import annotations

import os

# llama.cpp's OpenMP workers spin-wait; with the test runner, a browser and a server sharing two
# cores that collapses throughput. The backend sets the same default; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
