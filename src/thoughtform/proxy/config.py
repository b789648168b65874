"""How a proxy was started: upstream, voices, what clients get, recording and exposure."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import EMBEDDED_VOICES

# The names of the in-process upstreams (llama.cpp on the embedded model, plain or with the
# shipped voices adapter); anything else is an OpenAI-compatible server URL or a .gguf path.
EMBEDDED_UPSTREAMS = ("embedded", EMBEDDED_VOICES)
# How a multi-worker uvicorn hands the configuration to its worker processes.
CONFIG_ENV = "THOUGHTFORM_PROXY_CONFIG"
# Where the clients' key may come from instead of --api-key (keeps it out of `ps`).
KEY_ENV = "THOUGHTFORM_PROXY_KEY"
MAX_BODY_BYTES = 1_000_000


class ProxyConfigError(ValueError):
    """A proxy cannot start with these settings (one line naming the setting)."""


@dataclass(frozen=True)
class ProxyConfig:
    """Everything ``thoughtform proxy`` was told; plain values, so it travels as JSON."""

    upstream: str = EMBEDDED_VOICES
    model: str | None = None
    upstream_key: str | None = None
    voices: str = "seed"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    reasoning_voices: tuple[str, ...] = ()
    strip_markers: bool = False
    voice_prompt: bool = False
    db: str | None = None
    record: bool = True
    owner: str = ""  # the workbench user recorded sessions belong to ('' = shared)
    workers: int = 1
    max_body: int = MAX_BODY_BYTES
    max_tokens: int = 1024  # when the request names none
    alternatives: int = 5  # top-k asked of the upstream for the recorded telemetry
    max_concurrent: int = 64  # streams one process serves at once (more get 503)
    upstream_timeout: float = 120.0

    @property
    def embedded(self) -> bool:
        """Whether the model runs in this process (llama.cpp) rather than behind a URL."""
        return self.upstream in EMBEDDED_UPSTREAMS or self.upstream.lower().endswith(".gguf")

    def llama_model(self) -> str | None:
        """The llamacpp backend's ``model`` option for an in-process upstream."""
        if self.upstream.lower().endswith(".gguf"):
            return self.upstream
        if self.model:
            return self.model
        return None if self.upstream == "embedded" else self.upstream

    def to_json(self) -> str:
        """This configuration as JSON (for worker processes)."""
        d = dataclasses.asdict(self)
        d["reasoning_voices"] = list(self.reasoning_voices)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> ProxyConfig:
        """Inverse of :meth:`to_json` (unknown keys ignored)."""
        d: dict[str, Any] = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["reasoning_voices"] = tuple(d.get("reasoning_voices") or ())
        return cls(**d)

    def db_path(self) -> Path:
        """The sessions database: ``db`` or the workbench's default file."""
        from ..ui.config import default_db_path

        return Path(self.db).expanduser() if self.db else default_db_path()

    def check(self) -> None:
        """Refuse unsafe or impossible settings (raises ProxyConfigError)."""
        from ..ui.config import is_loopback

        if not is_loopback(self.host) and not self.api_key:
            raise ProxyConfigError(
                f"--host {self.host} is not loopback: give --api-key KEY (or ${KEY_ENV})"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ProxyConfigError("--api-key: the key is empty")
        if not 0 < self.port < 65536:
            raise ProxyConfigError(f"--port {self.port}: must be 1-65535")
        if self.workers < 1 or self.workers > 64:
            raise ProxyConfigError(f"--workers {self.workers}: must be 1-64")
        if self.max_body < 1024:
            raise ProxyConfigError(f"--max-body {self.max_body}: must be at least 1024 bytes")
        if not 1 <= self.max_tokens <= 1_000_000:
            raise ProxyConfigError(f"--max-tokens {self.max_tokens}: must be 1-1000000")
        if not 0 <= self.alternatives <= 20:
            raise ProxyConfigError(f"--alternatives {self.alternatives}: must be 0-20")
        if self.upstream.lower().endswith(".gguf") and not Path(self.upstream).is_file():
            raise ProxyConfigError(f"--upstream {self.upstream}: file not found")
        if not self.embedded and "://" not in self.upstream and ":" not in self.upstream:
            raise ProxyConfigError(
                f"--upstream {self.upstream!r}: expected embedded, embedded-voices, a .gguf"
                " file or a server URL such as http://127.0.0.1:8080/v1"
            )


def config_from_env() -> ProxyConfig:
    """The configuration a worker process was started with."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise ProxyConfigError(f"${CONFIG_ENV} is not set (start workers with `thoughtform proxy`)")
    return ProxyConfig.from_json(text)
