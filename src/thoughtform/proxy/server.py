"""Running the proxy under uvicorn: in the foreground (the CLI, one or several worker processes)
or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType
from typing import Any

from .config import CONFIG_ENV, ProxyConfig

# Streams still open at shutdown get this long to finish (each is cancelled after it).
GRACEFUL_S = 5


def serve(config: ProxyConfig) -> None:
    """Serve until interrupted. Several workers are separate processes, each with its own
    backend (a model in process is loaded once per worker) and its own database writer."""
    import uvicorn

    common: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": GRACEFUL_S,
    }
    if config.workers <= 1:
        from .app import create_app

        uvicorn.run(create_app(config), **common)
        return
    # Worker processes import the app factory and read the configuration from here.
    os.environ[CONFIG_ENV] = config.to_json()
    uvicorn.run(
        "thoughtform.proxy.app:app_from_env", factory=True, workers=config.workers, **common
    )


class BackgroundServer:
    """uvicorn serving ``app`` on a thread at 127.0.0.1 (port 0: a free one); a context manager
    that yields itself once the socket accepts connections."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="tf-proxy-server", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        """The bound port."""
        servers = getattr(self.server, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    @property
    def url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        """Start and wait until it serves."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the proxy server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Ask uvicorn to exit and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
