"""The voice set new sessions start with ("use for new sessions" in the Voices tab): a small
JSON file next to the sessions database, one per user when the workbench has logins."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..voices import VoiceSet, VoiceSetError, voice_set_from_dict

MAX_BYTES = 1_000_000


def defaults_path(db: str | Path, owner: str | None = None) -> Path:
    """Where the default voice set of ``owner`` (None: everyone on this server) is kept."""
    base = Path(db)
    if not owner:
        return base.with_name(base.stem + ".default-voices.json")
    tag = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return base.with_name(f"{base.stem}.default-voices.{tag}.json")


def load_default_voices(path: Path) -> dict[str, Any] | None:
    """The saved voice set as a mapping, or None when there is none (or it no longer loads)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        voice_set_from_dict(data, source=str(path))  # still valid?
    except (OSError, ValueError, VoiceSetError):
        return None
    return data if isinstance(data, dict) else None


def save_default_voices(path: Path, voices: VoiceSet) -> None:
    """Keep ``voices`` as the default for new sessions (written atomically, owner-only)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(voices.to_dict(), f, ensure_ascii=False)
    os.replace(tmp, path)


__all__ = ["defaults_path", "load_default_voices", "save_default_voices"]
