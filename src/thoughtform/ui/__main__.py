"""``python -m thoughtform.ui``: start the workbench without the main CLI (tests, screenshots)."""

from __future__ import annotations

import argparse

from .config import ConfigError, ServeConfig, resolve_auth


def main(argv: list[str] | None = None) -> None:
    """Parse a few flags and serve."""
    p = argparse.ArgumentParser(prog="python -m thoughtform.ui")
    p.add_argument("--backend", default=None)
    p.add_argument("--model")
    p.add_argument("--base-url")
    p.add_argument("--replay", help="trace or transcript to replay (sets --backend replay)")
    p.add_argument("--rate", type=float, default=0.0, help="replay tokens/s (0 = unthrottled)")
    p.add_argument("--voices", default="seed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--db")
    p.add_argument("--no-voice-prompt", action="store_true")
    p.add_argument("--max-tokens", type=int, default=256, help="Max tokens of new sessions")
    p.add_argument("--auth", help="USER:PASS (shows in ps: prefer $THOUGHTFORM_AUTH)")
    p.add_argument("--auth-file", help="file of USER:PASS lines")
    p.add_argument("--insecure", action="store_true")
    a = p.parse_args(argv)
    try:
        auth = resolve_auth(a.auth, a.auth_file)
    except ConfigError as e:
        p.error(str(e))
    from .app import serve

    serve(
        ServeConfig(
            backend=a.backend or ("replay" if a.replay else "llamacpp"),
            model=a.model,
            base_url=a.base_url,
            replay=a.replay,
            voices=a.voices,
            host=a.host,
            port=a.port,
            db=a.db,
            voice_prompt=not a.no_voice_prompt,
            replay_rate=a.rate,
            auth=auth,
            insecure=a.insecure,
            max_tokens=a.max_tokens,
        )
    )


if __name__ == "__main__":
    main()
