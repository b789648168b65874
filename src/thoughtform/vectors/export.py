"""Write a trained run as ``DIR/<Voice>.gguf`` (llama.cpp control vectors) plus ``DIR/vectors.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .cvec import write_control_vector
from .sets import DEFAULT_STRENGTH, FORMAT, META
from .train import TrainOutcome, VectorTrainConfig, data_hash

SCALE_NOTE = (
    "each layer's direction is that layer's mean voice-vs-others difference of the content "
    "tokens' residual stream, scaled so that the directions of all steered layers sum to the "
    "difference at the last steered layer: strength 1 adds about one natural voice contrast"
)


def _r(x: float, nd: int = 4) -> float | None:
    return None if math.isnan(x) else round(float(x), nd)


def vectors_meta(outcome: TrainOutcome, cfg: VectorTrainConfig) -> dict[str, Any]:
    """The ``vectors.json`` document of a run (no timings or paths: same inputs, same bytes)."""
    f = outcome.features
    voices: dict[str, Any] = {}
    for name, r in outcome.results.items():
        acc = [a for a in r.accuracy.values() if not math.isnan(a)]
        voices[name] = {
            "file": f"{name}.gguf",
            "pairs": r.pairs,
            "heldout_pairs": r.heldout_pairs,
            "heldout_accuracy": _r(sum(acc) / len(acc)) if acc else None,
            "norms": {str(k): _r(v, 5) for k, v in r.vector.norms().items()},
            "heldout_accuracy_by_layer": {str(k): _r(v) for k, v in r.accuracy_all.items()},
        }
    accs = [v["heldout_accuracy"] for v in voices.values() if v["heldout_accuracy"] is not None]
    return {
        "format": FORMAT,
        "method": cfg.method,
        "layers": list(outcome.layers),
        "model_hint": f.model_hint,
        "base": cfg.base if cfg.base == "embedded" else Path(cfg.base).name,
        "n_embd": f.n_embd,
        "n_layer": f.n_layer,
        "voice_set": cfg.voices if "/" not in cfg.voices else Path(cfg.voices).name,
        "data": {
            "files": [Path(p).name for p in cfg.data],
            "sha256": data_hash(cfg.data),
            "train_replies": outcome.train_examples,
            "heldout_replies": outcome.heldout_examples,
            "skipped": outcome.skipped,
            "content_tokens": f.tokens,
        },
        "seed": cfg.seed,
        "max_examples": cfg.max_examples,
        "holdout": cfg.holdout,
        "max_len": cfg.max_len,
        "scale": SCALE_NOTE,
        "mean_heldout_accuracy": _r(sum(accs) / len(accs)) if accs else None,
        "default_strengths": {name: DEFAULT_STRENGTH for name in outcome.results},
        "voices": voices,
    }


def write_vector_dir(outcome: TrainOutcome, cfg: VectorTrainConfig) -> Path:
    """Write every voice's GGUF and ``vectors.json`` into ``cfg.out``; returns the directory."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    hint = outcome.features.model_hint
    for name, r in outcome.results.items():
        write_control_vector(r.vector, out / f"{name}.gguf", model_hint=hint)
    meta = vectors_meta(outcome, cfg)
    (out / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out
