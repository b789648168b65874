"""The Host/Origin guard as an ASGI middleware (the HTTP tests run it inside the real server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from thoughtform.ui.config import ServeConfig, allowed_hosts
from thoughtform.ui.guard import REFUSED_HOST, REFUSED_ORIGIN, HostOriginGuard, check_request

LOOP = frozenset(allowed_hosts(ServeConfig(port=7860)) or [])


def test_allowed_hosts_are_loopback_names_with_the_port() -> None:
    assert LOOP == {"127.0.0.1:7860", "localhost:7860", "[::1]:7860"}
    assert set(allowed_hosts(ServeConfig(host="127.0.0.2", port=81)) or []) == {
        "127.0.0.1:81",
        "localhost:81",
        "[::1]:81",
        "127.0.0.2:81",
    }
    assert "[::1]:7860" in (allowed_hosts(ServeConfig(host="::1")) or [])
    assert allowed_hosts(ServeConfig(host="0.0.0.0", auth=("a", "b"))) is None


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"host": "127.0.0.1:7860"}, None),
        ({"host": "LOCALHOST:7860"}, None),
        ({"host": "[::1]:7860", "origin": "http://[::1]:7860"}, None),
        ({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}, None),
        # The browser navigating from another site's link is fine (it cannot read the page).
        (
            {
                "host": "127.0.0.1:7860",
                "sec-fetch-site": "cross-site",
                "sec-fetch-mode": "navigate",
            },
            None,
        ),
        (
            {"host": "127.0.0.1:7860", "sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"},
            None,
        ),
        # DNS rebinding: the attacker's name, pointed at 127.0.0.1.
        ({"host": "evil.example"}, REFUSED_HOST),
        ({"host": "evil.example:7860", "origin": "http://evil.example:7860"}, REFUSED_HOST),
        ({"host": "127.0.0.1:7861"}, REFUSED_HOST),
        ({"host": "127.0.0.1"}, REFUSED_HOST),  # port 80 is not this workbench's
        ({}, REFUSED_HOST),
        # Cross-site requests from a page on another site.
        ({"host": "127.0.0.1:7860", "origin": "http://evil.example"}, REFUSED_ORIGIN),
        ({"host": "127.0.0.1:7860", "origin": "null"}, REFUSED_ORIGIN),
        ({"host": "127.0.0.1:7860", "origin": "http://localhost:7860"}, REFUSED_ORIGIN),
        (
            {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860@evil.example"},
            REFUSED_ORIGIN,
        ),
        ({"host": "127.0.0.1:7860", "origin": "file://"}, REFUSED_ORIGIN),
        ({"host": "127.0.0.1:7860", "sec-fetch-site": "cross-site"}, REFUSED_ORIGIN),
    ],
)
def test_check_request_on_loopback(headers: dict[str, str], why: bytes | None) -> None:
    assert check_request(headers, "http", LOOP) == why


def test_public_bind_checks_origin_against_host() -> None:
    assert check_request({"host": "wb.example.org"}, "https", None) is None
    ok = {"host": "wb.example.org", "origin": "https://wb.example.org"}
    assert check_request(ok, "https", None) is None
    assert check_request({**ok, "host": "wb.example.org:443"}, "https", None) is None
    bad = {"host": "wb.example.org", "origin": "https://evil.example"}
    assert check_request(bad, "https", None) == REFUSED_ORIGIN


def call(scope: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    sent: list[dict[str, Any]] = []
    reached: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(msg: Any) -> None:
        sent.append(dict(msg))

    asyncio.run(HostOriginGuard(app, sorted(LOOP))(scope, receive, send))
    return sent, bool(reached)


def test_middleware_answers_403_before_the_app() -> None:
    sent, reached = call(
        {"type": "http", "scheme": "http", "headers": [(b"host", b"evil.example")]}
    )
    assert not reached
    assert sent[0]["status"] == 403 and sent[1]["body"] == REFUSED_HOST
    assert (b"content-type", b"text/plain; charset=utf-8") in sent[0]["headers"]
    # Two different Host headers: refused, whichever one the app would have read.
    two = [(b"host", b"127.0.0.1:7860"), (b"host", b"evil.example")]
    sent, reached = call({"type": "http", "scheme": "http", "headers": two})
    assert not reached and sent[0]["status"] == 403
    sent, reached = call(
        {"type": "http", "scheme": "http", "headers": [(b"host", b"127.0.0.1:7860")]}
    )
    assert reached and sent == []


def test_middleware_closes_hostile_websockets_and_passes_lifespan() -> None:
    hdrs = [(b"host", b"127.0.0.1:7860"), (b"origin", b"http://evil.example")]
    sent, reached = call({"type": "websocket", "scheme": "ws", "headers": hdrs})
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]
    ok = [(b"host", b"127.0.0.1:7860"), (b"origin", b"http://127.0.0.1:7860")]
    sent, reached = call({"type": "websocket", "scheme": "ws", "headers": ok})
    assert reached
    _, reached = call({"type": "lifespan"})
    assert reached
