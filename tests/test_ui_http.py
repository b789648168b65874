"""The workbench over plain HTTP: auth guards every route, no file outside the app is served,
and a non-loopback bind without auth is refused."""

from __future__ import annotations

import os
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


# -- requests from other web sites (DNS rebinding, cross-site) -------------------------------

EVIL_HOST = {"Host": "evil.example"}
EVIL_ORIGIN = {"Origin": "http://evil.example"}
ROUTES = [
    ("GET", ""),
    ("GET", "config"),
    ("GET", "gradio_api/info"),
    ("POST", "gradio_api/queue/join"),
    ("GET", "gradio_api/queue/data?session_hash=h"),
    ("GET", "gradio_api/heartbeat/h"),
    ("POST", "gradio_api/upload"),
    ("GET", "gradio_api/file=/etc/passwd"),
    ("POST", "gradio_api/component_server"),
    ("POST", "gradio_api/run/predict"),
    ("POST", "login"),
    ("GET", "logout"),
    ("GET", "theme.css"),
]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """On loopback without a login: the case a DNS-rebinding page goes for."""
    d = tmp_path_factory.mktemp("ui-open")
    srv = Server(d / "s.db", replay=FIX, model="voices.jsonl")
    yield srv
    srv.stop()


def own(srv: Server, host: str = "127.0.0.1") -> dict[str, str]:
    return {"Host": f"{host}:{srv.port}", "Origin": f"http://{host}:{srv.port}"}


def read_sessions(c: httpx.Client, headers: dict[str, str], sid: str = "h1") -> httpx.Response:
    """What an attacker's page wants: run the page's load event and read its answer (the
    session list) from the queue's event stream."""
    join = c.post(
        "gradio_api/queue/join",
        json={"data": [], "fn_index": 0, "session_hash": sid, "trigger_id": None},
        headers=headers,
    )
    if join.status_code != 200:
        return join
    return c.get(f"gradio_api/queue/data?session_hash={sid}", headers=headers)


@pytest.mark.parametrize("hostile", [EVIL_HOST, EVIL_ORIGIN, {"Origin": "null"}])
def test_other_sites_are_refused_everywhere(open_server: Server, hostile: dict[str, str]) -> None:
    with httpx.Client(base_url=open_server.url, timeout=10) as c:
        for method, route in ROUTES:
            r = c.request(method, route, headers=hostile)
            assert r.status_code == 403, (method, route, r.status_code)
            assert r.headers["content-type"].startswith("text/plain")
            assert r.text.startswith("thoughtform: refused:"), r.text
            assert len(r.content) < 100
        r = read_sessions(c, hostile)
        assert r.status_code == 403 and b"New session" not in r.content


def test_dns_rebinding_with_the_port_is_refused(open_server: Server) -> None:
    rebound = {"Host": f"evil.example:{open_server.port}"}
    rebound["Origin"] = f"http://{rebound['Host']}"  # the page's own origin, to the browser
    with httpx.Client(base_url=open_server.url, timeout=10) as c:
        assert read_sessions(c, rebound).status_code == 403
        assert c.get("config", headers=rebound).status_code == 403
        # A page without CORS (an <img>, a <script>) carries no Origin, but says cross-site.
        r = c.get("config", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
        assert r.status_code == 403


def test_the_page_own_headers_work(open_server: Server) -> None:
    with httpx.Client(base_url=open_server.url, timeout=10) as c:
        for host in ("127.0.0.1", "localhost"):
            hdrs = own(open_server, host)
            assert c.get("", headers={"Host": hdrs["Host"]}).status_code == 200
            assert c.get("config", headers=hdrs).status_code == 200
        r = read_sessions(c, own(open_server))
        assert r.status_code == 200 and b"process_completed" in r.content
        assert b"New session" in r.content  # the page's own load event reads the sessions
        # A link from another site opens the page (top-level navigation).
        nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        assert c.get("", headers=nav).status_code == 200


def test_a_login_cookie_does_not_help_another_site(server: Server) -> None:
    """Gradio's login cookie is SameSite=None: the browser sends it with a cross-site request.
    The Origin check refuses such a request even though the cookie is valid."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        hdrs = own(server)
        r = c.post("login", data={"username": "ann", "password": "s3cret"}, headers=hdrs)
        assert r.status_code == 200
        assert c.get("config", headers=hdrs).status_code == 200
        assert c.get("config", headers=EVIL_ORIGIN).status_code == 403
        assert read_sessions(c, EVIL_ORIGIN).status_code == 403
        r = c.post("login", data={"username": "ann", "password": "s3cret"}, headers=EVIL_ORIGIN)
        assert r.status_code == 403


def test_login_from_the_environment_and_a_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# the team\nann:a-pass\nbob:b-pass\n", encoding="utf-8")
    users.chmod(0o600)
    env = {**os.environ, "THOUGHTFORM_AUTH": "eve:e-pass"}
    srv = Server(tmp_path / "s.db", replay=FIX, model="voices.jsonl", env=env)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("config").status_code == 401
            bad = c.post("login", data={"username": "eve", "password": "nope"})
            assert bad.status_code == 400
            assert (
                c.post("login", data={"username": "eve", "password": "e-pass"}).status_code == 200
            )
            assert c.get("config").status_code == 200
    finally:
        srv.stop()
    srv = Server(
        tmp_path / "s.db", replay=FIX, model="voices.jsonl", extra=["--auth-file", str(users)]
    )
    try:
        for user, pw in (("ann", "a-pass"), ("bob", "b-pass")):
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                assert c.post("login", data={"username": user, "password": pw}).status_code == 200
                assert c.get("config").status_code == 200
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert (
                c.post("login", data={"username": "ann", "password": "b-pass"}).status_code == 400
            )
    finally:
        srv.stop()
