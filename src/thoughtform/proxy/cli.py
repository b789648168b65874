"""``thoughtform proxy``: its options and start-up (wired into :mod:`thoughtform.cli`)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import KEY_ENV, ProxyConfig, ProxyConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The proxy's command-line options."""
    p.add_argument(
        "--upstream",
        default="embedded-voices",
        help="embedded | embedded-voices (default) | a .gguf file | an OpenAI-compatible URL",
    )
    p.add_argument("--model", help="the upstream server's model name (or a GGUF for embedded)")
    p.add_argument(
        "--upstream-key", help="API key for the upstream server (env THOUGHTFORM_API_KEY)"
    )
    p.add_argument("--voices", default="seed", help="preset (seed|think|plain) or YAML path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"key clients must send as Bearer (env {KEY_ENV})")
    p.add_argument(
        "--reasoning-voices",
        default="",
        help="comma-separated voices sent as reasoning (delta.reasoning and reasoning_content)",
    )
    p.add_argument("--strip-markers", action="store_true", help="remove voice markers from content")
    p.add_argument(
        "--voice-prompt", action="store_true", help="prepend the voice system prompt to chats"
    )
    p.add_argument("--db", help="SQLite sessions file (default: the workbench's)")
    p.add_argument("--no-record", action="store_true", help="do not record exchanges")
    p.add_argument(
        "--owner",
        default="",
        help="workbench user the recorded sessions belong to (serve with a login shows a user"
        " only their own sessions; default: shared)",
    )
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--max-tokens", type=int, default=1024, help="when a request names none")
    p.add_argument(
        "--alternatives", type=int, default=5, help="top-k alternatives asked for the recording"
    )
    p.add_argument("--max-body", type=int, default=1_000_000, help="request body cap in bytes")
    p.add_argument("--max-concurrent", type=int, default=64, help="streams per worker at once")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """The configuration the options describe."""
    key = args.api_key or os.environ.get(KEY_ENV) or None
    voices = tuple(v.strip() for v in (args.reasoning_voices or "").split(",") if v.strip())
    return ProxyConfig(
        upstream=args.upstream.strip(),
        model=args.model,
        upstream_key=args.upstream_key,
        voices=args.voices,
        host=args.host,
        port=args.port,
        api_key=key,
        reasoning_voices=voices,
        strip_markers=args.strip_markers,
        voice_prompt=args.voice_prompt,
        db=args.db,
        record=not args.no_record,
        owner=args.owner.strip(),
        workers=args.workers,
        max_body=args.max_body,
        max_tokens=args.max_tokens,
        alternatives=args.alternatives,
        max_concurrent=args.max_concurrent,
    )


def run(args: argparse.Namespace) -> int:
    """Check the settings, then serve until interrupted (mistakes: UserError, exit 2)."""
    from ..cli import UserError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"proxy needs starlette and uvicorn: pip install 'thoughtform[ui]' ({e.name})"
        ) from None
    cfg = config_from_args(args)
    try:
        cfg.check()
        # Fail here, in one line, on a bad voice set or database (before any model loads).
        _check_voices(cfg)
        if cfg.record:
            _check_db(cfg)
    except ProxyConfigError as e:
        raise UserError(str(e)) from None
    where = f"http://{cfg.host}:{cfg.port}/v1"
    rec = f"recording to {cfg.db_path()}" if cfg.record else "not recording"
    print(
        f"thoughtform proxy: {where} -> {cfg.upstream} ({rec}, {cfg.workers} worker(s))",
        file=sys.stderr,
    )
    from .server import serve

    try:
        serve(cfg)
    except ProxyConfigError as e:
        raise UserError(str(e)) from None
    return 0


def _check_voices(cfg: ProxyConfig) -> None:
    """Voice set and ``--reasoning-voices`` are valid (cheap, before any model loads)."""
    from ..voices import VoiceSetError, resolve_voice_set
    from .app import reasoning_voices

    try:
        vs = resolve_voice_set(cfg.voices)
    except VoiceSetError as e:
        raise ProxyConfigError(str(e)) from None
    reasoning_voices(vs, cfg.reasoning_voices)


def _check_db(cfg: ProxyConfig) -> None:
    """The sessions database opens (and is one)."""
    from ..ui.store import Store, StoreError

    try:
        Store(cfg.db_path()).close()
    except StoreError as e:
        raise ProxyConfigError(f"--db: {e}") from None
