"""``thoughtform bench steer``: what steering costs on the embedded model, side by side.

One process, one backend (``embedded-voices``), interleaved rounds over the same prompts and
seeds: (plain) full telemetry and voice parsing with the conductor inert (no scoring, nothing
steered); (steer) the same plus a muted voice, per-voice sampling for two voices and who-speaks-
next scoring at every boundary (all eight markers as parallel sequences); (vectors) the steer run
plus the shipped voice vectors switched at each boundary, when they are installed. Speed is the
whole reply's tokens over its whole time, so the boundary scoring is amortised over the reply.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

PROMPTS = (
    "Tell me about the sea at night.",
    "Should I change my job?",
    "What does a cat think about?",
)


def _run(backend: Any, plan: Any, prompt: str, seed: int, tokens: int) -> tuple[int, float, int]:
    from ..conversation import ChatSettings, build_request
    from ..generate import Generation
    from ..voices import resolve_voice_set

    vs = resolve_voice_set("seed")
    st = ChatSettings(model="embedded-voices", seed=seed, max_tokens=tokens, alternatives=10)
    # Length-bound runs: the end of generation is banned so every run decodes `tokens` tokens.
    req = build_request(st, vs, [("user", prompt)])
    eos = sorted(backend.vocab().eog)
    req = type(req)(
        messages=req.messages,
        sampling=req.sampling,
        alternatives=req.alternatives,
        logit_bias=dict.fromkeys(eos, -1e9),
    )
    t0 = time.perf_counter()
    tr = Generation(backend, req, vs, steer=plan).run()
    dt = time.perf_counter() - t0
    return len(tr.tokens), dt, len(tr.voice_choices)


def bench_steer(tokens: int = 200, rounds: int = 3) -> dict[str, Any]:
    """Median tokens/s of plain telemetry vs steering (vs voice vectors), and their ratios."""
    from ..backends import create_backend
    from ..steer import SteerPlan

    backend = create_backend("llamacpp", model="embedded-voices")
    plans: dict[str, SteerPlan] = {
        "plain": SteerPlan(score_voices=False),
        "steer": SteerPlan(
            mute=frozenset({"Echo"}),
            voice_sampling={"Doubt": (1.0, 0.9), "Pulse": (0.4, None)},
            score_voices=True,
        ),
    }
    try:
        from ..vectors import seed_vectors_dir

        if seed_vectors_dir() is not None:
            plans["vectors"] = SteerPlan(
                mute=frozenset({"Echo"}),
                voice_sampling={"Doubt": (1.0, 0.9), "Pulse": (0.4, None)},
                vectors={"Doubt": 1.0, "Pulse": 1.0, "Shift": 1.0},
            )
    except (ImportError, AttributeError):
        pass
    speeds: dict[str, list[float]] = {k: [] for k in plans}
    boundaries = 0
    try:
        _run(backend, plans["plain"], "warm up", 0, 8)
        for r in range(rounds):
            for i, prompt in enumerate(PROMPTS):
                for name, plan in plans.items():
                    n, dt, b = _run(backend, plan, prompt, 100 * r + i, tokens)
                    speeds[name].append(n / dt)
                    if name == "steer":
                        boundaries += b
    finally:
        backend.close()
    med = {k: statistics.median(v) for k, v in speeds.items()}
    out: dict[str, Any] = {
        "tokens": tokens,
        "rounds": rounds,
        "plain_tok_s": round(med["plain"], 2),
        "steer_tok_s": round(med["steer"], 2),
        "ratio": round(med["steer"] / med["plain"], 3),
        "boundaries_per_reply": round(boundaries / (rounds * len(PROMPTS)), 2),
    }
    if "vectors" in med:
        out["vectors_tok_s"] = round(med["vectors"], 2)
        out["vectors_ratio"] = round(med["vectors"] / med["steer"], 3)
    return out
