"""Refuse requests that come from other web sites (DNS rebinding, cross-site requests).

A page on any web site can make the browser send requests to ``127.0.0.1:7860``. Two checks stop
it from reading or changing sessions:

- ``Host``: on a loopback bind, only the loopback names (and the configured ``--host``) with the
  port. A DNS-rebinding page (``evil.example`` re-pointed to 127.0.0.1) arrives with
  ``Host: evil.example:7860`` and is refused (the class of Ollama's CVE-2024-28224).
- ``Origin``: when a browser sends one (every cross-origin fetch, every POST), it must be the
  page's own origin, the one in ``Host``. This covers Gradio's whole API (``/gradio_api/...``,
  the queue and its event streams, uploads, ``/file=``, the login form) because the check
  runs in front of every route. ``Sec-Fetch-Site: cross-site`` on anything but a top-level
  navigation is refused too (a request without CORS, e.g. ``<img src>``, carries no Origin).

Requests without ``Origin`` (curl, the browser's own navigation) pass the Origin check: a page
on another site cannot send a request without one and read the answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REFUSED_HOST = b"thoughtform: refused: this workbench answers only to its own address (Host)\n"
REFUSED_ORIGIN = b"thoughtform: refused: request from another web site (Origin)\n"
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _authority(host: str, scheme: str) -> str:
    """``host[:port]`` lowercased, without the scheme's default port."""
    h = host.strip().lower()
    port = _DEFAULT_PORTS.get(scheme)
    if port and h.endswith(f":{port}"):
        h = h[: -len(port) - 1]
    return h


def origin_authority(origin: str) -> tuple[str, str] | None:
    """(scheme, authority) of an ``Origin`` header; None for ``null`` or anything malformed."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    return parts.scheme, _authority(parts.netloc, parts.scheme)


def check_request(
    headers: dict[str, str], scheme: str, allowed_hosts: frozenset[str] | None
) -> bytes | None:
    """Why a request is refused (the message to send), or None when it may pass.

    ``headers`` has lowercased names; ``allowed_hosts`` (lowercased ``name:port`` values) is
    None when any ``Host`` is accepted (a non-loopback bind)."""
    host = headers.get("host", "")
    if allowed_hosts is not None:
        bare = host.strip().lower()
        # A missing port means the scheme's default: accept it only when that is the port.
        with_port = bare if _has_port(bare) else f"{bare}:{_DEFAULT_PORTS.get(scheme, '80')}"
        if not bare or with_port not in allowed_hosts:
            return REFUSED_HOST
    origin = headers.get("origin")
    if origin is not None:
        got = origin_authority(origin)
        if got is None or got[1] != _authority(host, got[0]):
            return REFUSED_ORIGIN
    site = headers.get("sec-fetch-site", "").lower()
    if site == "cross-site" and headers.get("sec-fetch-mode", "").lower() != "navigate":
        return REFUSED_ORIGIN
    return None


def _has_port(host: str) -> bool:
    if host.startswith("["):
        return "]:" in host
    return ":" in host


class HostOriginGuard:
    """ASGI middleware: answers 403 with a short plain-text reason to a request from another
    web site, before any route sees it (HTTP and websockets; lifespan passes)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = (
            None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check, then pass the request on or refuse it."""
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            name = k.decode("latin-1").lower()
            # Two Host or Origin headers are an attack or a broken client: keep the first
            # ``host`` for comparison but refuse a second different value below.
            value = v.decode("latin-1")
            if name in headers and name in ("host", "origin") and headers[name] != value:
                headers[name] = "\x00conflict"
                continue
            headers.setdefault(name, value)
        scheme = str(scope.get("scheme") or "http")
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        why = check_request(headers, scheme, self.allowed_hosts)
        if why is None:
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(why)).encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": why})
