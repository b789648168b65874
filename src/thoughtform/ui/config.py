"""Workbench configuration: what ``thoughtform serve`` was started with, and where sessions live."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


class ConfigError(ValueError):
    """The serve configuration is unsafe or inconsistent; the message says what to change."""


@dataclass
class ServeConfig:
    """Options of ``thoughtform serve`` (the CLI fills it; tests build it directly)."""

    backend: str = "llamacpp"
    model: str | None = None
    base_url: str | None = None
    replay: str | None = None
    voices: str = "seed"
    host: str = "127.0.0.1"
    port: int = 7860
    db: str | None = None
    auth: tuple[str, str] | None = None
    insecure: bool = False
    voice_prompt: bool = True
    replay_rate: float = 0.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeConfig) -> str | None:
    """Refuse a non-loopback bind without auth unless ``insecure``; return a warning to print."""
    if is_loopback(cfg.host):
        return None
    if cfg.auth is not None:
        user, pw = cfg.auth
        if not user or not pw:
            raise ConfigError("auth needs a non-empty user and password")
        return None
    if not cfg.insecure:
        raise ConfigError(
            f"host {cfg.host} is not loopback: give auth=(user, password) or insecure=True"
        )
    return (
        f"WARNING: serving on {cfg.host} without authentication: anyone who can reach it can use it"
    )


def default_db_path() -> Path:
    """The sessions database under the user data dir (created on first use)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("thoughtform", appauthor=False)) / "sessions.sqlite3"


def db_path(cfg: ServeConfig) -> Path:
    """The database this server uses: ``cfg.db`` or the default."""
    return Path(cfg.db).expanduser() if cfg.db else default_db_path()
