"""Workbench configuration: what ``thoughtform serve`` was started with, and where sessions live."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)
# The names a browser on this machine uses for a loopback workbench (the Host header check).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
AUTH_ENV = "THOUGHTFORM_AUTH"
MAX_AUTH_USERS = 1000

Credentials = tuple[str, str]


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
    # One (user, password) pair or a list of them (several users, each with their own sessions).
    auth: Credentials | list[Credentials] | None = None
    insecure: bool = False
    voice_prompt: bool = True
    replay_rate: float = 0.0
    max_tokens: int = 256  # the Max tokens a new session starts with


def auth_users(cfg: ServeConfig) -> list[Credentials]:
    """The configured (user, password) pairs; empty when the workbench has no login."""
    if cfg.auth is None:
        return []
    if isinstance(cfg.auth, tuple) and len(cfg.auth) == 2 and isinstance(cfg.auth[0], str):
        return [(str(cfg.auth[0]), str(cfg.auth[1]))]
    return [(str(u), str(p)) for u, p in cfg.auth]


def parse_credentials(text: str, where: str) -> Credentials:
    """One ``USER:PASS`` (the password may contain ``:``; spaces around either are dropped);
    ``where`` names the source in errors."""
    user, sep, pw = text.partition(":")
    user, pw = user.strip(), pw.strip()
    if not sep or not user or not pw:
        raise ConfigError(f"{where}: expected USER:PASS with a non-empty user and password")
    if any(c.isspace() for c in user) or len(user) > 64:
        raise ConfigError(f"{where}: a user name is 1-64 characters without spaces")
    return user, pw


def read_auth_file(path: str | Path) -> list[Credentials]:
    """Users from a file of ``USER:PASS`` lines (blank lines and ``#`` comments skipped)."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: auth file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a file of USER:PASS lines") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    users: list[Credentials] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        users.append(parse_credentials(line, f"{p}: line {n}"))
    if not users:
        raise ConfigError(f"{p}: no USER:PASS lines")
    return users


def auth_file_warning(path: str | Path) -> str | None:
    """A warning when other local users can read the auth file."""
    try:
        mode = Path(path).expanduser().stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"WARNING: {path} is readable by other users (chmod 600 it)"
    return None


def resolve_auth(
    arg: str | None, file: str | None, env: Mapping[str, str] | None = None
) -> list[Credentials] | None:
    """Who may log in: ``--auth USER:PASS`` and ``--auth-file PATH`` (combined), else
    ``$THOUGHTFORM_AUTH`` (``USER:PASS``); None when none is given (no login)."""
    env = os.environ if env is None else env
    users: list[Credentials] = []
    if arg is not None:
        users.append(parse_credentials(arg, "--auth"))
    if file is not None:
        users += read_auth_file(file)
    if arg is None and file is None and env.get(AUTH_ENV):
        users.append(parse_credentials(env[AUTH_ENV], f"${AUTH_ENV}"))
    if not users:
        return None
    seen: set[str] = set()
    for user, _ in users:
        if user in seen:
            raise ConfigError(f"auth: user {user!r} is given twice")
        seen.add(user)
    if len(users) > MAX_AUTH_USERS:
        raise ConfigError(f"auth: at most {MAX_AUTH_USERS} users")
    return users


def allowed_hosts(cfg: ServeConfig) -> list[str] | None:
    """``Host`` header values a loopback workbench answers (each name with the port); None
    for a non-loopback bind, where the names people use cannot be known in advance."""
    if not is_loopback(cfg.host):
        return None
    h = cfg.host.lower()
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"  # an IPv6 literal appears in brackets in a Host header
    names = dict.fromkeys([*LOOPBACK_HOSTS, h])
    return [f"{n}:{cfg.port}" for n in names]


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
    users = auth_users(cfg)
    if users:
        if any(not user or not pw for user, pw in users):
            raise ConfigError("auth needs a non-empty user and password")
        return None
    if not cfg.insecure:
        raise ConfigError(
            f"host {cfg.host} is not loopback: give a login (--auth-file PATH, ${AUTH_ENV} or"
            " --auth USER:PASS), or allow it without one with --insecure"
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
