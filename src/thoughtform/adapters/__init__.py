"""LoRA adapters shipped with thoughtform (GGUF, for llama.cpp over the embedded model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOICES_ADAPTER = "voices-seed.gguf"

# The recipe of the shipped adapter; scripts/build_adapter.sh passes the same values.
SHIPPED_SYNTH: dict[str, Any] = {"n": 2000, "seed": 0}


def voices_adapter_path() -> Path:
    """Path of the shipped voices adapter (seed voice set) for the embedded SmolLM2."""
    return Path(__file__).with_name(VOICES_ADAPTER)
