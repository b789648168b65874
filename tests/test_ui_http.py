"""The workbench over plain HTTP: auth guards every route, no file outside the app is served,
and a non-loopback bind without auth is refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from thoughtform.ui.harness import Server, free_port

FIX = Path(__file__).parent / "fixtures" / "ui"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("ui-http")
    srv = Server(d / "s.db", replay=FIX, model="voices.jsonl", extra=["--auth", "ann:s3cret"])
    yield srv
    srv.stop()


def test_auth_guards_the_app(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("config").status_code == 401
        r = c.post(
            "gradio_api/component_server",
            json={
                "data": ["x", 0, 1],
                "component_id": 1,
                "session_hash": "h",
                "fn_name": "tf_events",
            },
        )
        assert r.status_code == 401
        assert c.post("login", data={"username": "ann", "password": "wrong"}).status_code == 400
        assert c.get("config").status_code == 401
        assert c.post("login", data={"username": "ann", "password": "s3cret"}).status_code == 200
        cfg = c.get("config")
        assert cfg.status_code == 200
        assert cfg.json().get("share_url") in (None, "")


def test_no_files_outside_the_app(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        c.post("login", data={"username": "ann", "password": "s3cret"})
        for target in (
            ROOT / "pyproject.toml",
            FIX / "voices.jsonl",
            server.db,
            Path("/etc/passwd"),
        ):
            for route in ("gradio_api/file=", "file="):
                r = c.get(f"{route}{target}")
                assert r.status_code in (403, 404), (route, target, r.status_code)
                assert b"[project]" not in r.content and b"root:" not in r.content
        r = c.get("gradio_api/file=../../pyproject.toml")
        assert r.status_code in (403, 404)


def test_public_bind_without_auth_is_refused(tmp_path: Path) -> None:
    port = free_port()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "thoughtform.ui",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--db",
            str(tmp_path / "s.db"),
            "--replay",
            str(FIX / "voices.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "not loopback" in p.stderr and "auth" in p.stderr
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened
