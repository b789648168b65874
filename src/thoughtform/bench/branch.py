"""``thoughtform bench branch``: how fast a branch starts and what N children cost together.

One process, the embedded-voices model. A parent reply of ``prefix`` tokens is generated once
(its end of generation banned); then (1) ``fork_first_token_s``: the time from asking for a
branch at the parent's last token to its first new token, the prefix's KV cache reused (median
of 3 forks); (2) ``n4_over_n1``: four children sampled together in one batch per step against
one child alone, same length, interleaved rounds (median).

``backend="transformers"`` reports the same keys for the transformers backend, which has no KV
cache to reuse between requests (each fork feeds prompt + prefix again) and no batched children
(four children are four runs): the "other backends are slower" number.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any


def _children(backend: Any, request: Any, n: int, seeds: list[int]) -> None:
    """``n`` children of one fork: batched where the backend can, else one after another."""
    sample = getattr(backend, "sample_children", None)
    if sample is not None:
        sample(request, n, seeds)
        return
    for sd in seeds:
        for _ in backend.stream(replace(request, sampling=replace(request.sampling, seed=sd))):
            pass


def bench_branch(
    prefix: int = 500, tokens: int = 64, rounds: int = 3, backend_name: str = "llamacpp"
) -> dict[str, Any]:
    """Branch timings on the embedded model (see the module docstring)."""
    from ..backends import create_backend
    from ..backends.base import TokenEvent
    from ..conversation import ChatSettings, build_request
    from ..generate import Generation
    from ..loom import parent_request
    from ..voices import resolve_voice_set

    vs = resolve_voice_set("seed")
    backend: Any = create_backend(backend_name, model="embedded-voices")
    try:
        st = ChatSettings(seed=0, max_tokens=prefix, alternatives=5)
        req = build_request(st, vs, [("user", "Tell me a long story about the sea and a voice.")])
        eos = sorted(backend.vocab().eog)
        req = replace(req, logit_bias=dict.fromkeys(eos, -1e9))
        parent = Generation(backend, req, vs).run()
        ids = [t.token_id for t in parent.tokens if t.token_id is not None]
        base = replace(parent_request(parent), logit_bias=dict.fromkeys(eos, -1e9))
        firsts = []
        for r in range(rounds):
            # The parent (or the previous branch) is in the cache: the fork reuses it.
            at = len(ids) - 1 - r
            alt = parent.tokens[at].top[1].token_id or 0
            fork = replace(
                base,
                prefix=tuple(ids[:at]),
                forced=(alt,),
                sampling=replace(base.sampling, seed=r, max_tokens=4),
            )
            t0 = time.perf_counter()
            got = None
            stream = backend.stream(fork)
            try:
                for ev in stream:
                    if isinstance(ev, TokenEvent) and not ev.forced:
                        got = time.perf_counter() - t0
                        break
            finally:
                stream.close()
            firsts.append(got if got is not None else float("nan"))
            if hasattr(backend, "_eval_prompt"):
                # Put the parent back in the cache for the next fork, as a live session would.
                backend._eval_prompt(backend.prompt_ids(base) + ids, fresh=False)
        at = len(ids) // 2
        child = replace(
            base, prefix=tuple(ids[:at]), sampling=replace(base.sampling, max_tokens=tokens)
        )
        t1: list[float] = []
        t4: list[float] = []
        for r in range(rounds):
            for n, acc in ((1, t1), (4, t4)):
                t0 = time.perf_counter()
                _children(backend, child, n, [100 * r + i for i in range(n)])
                acc.append(time.perf_counter() - t0)
    finally:
        backend.close()
    return {
        "backend": backend_name,
        "prefix_tokens": len(ids),
        "tokens": tokens,
        "fork_first_token_s": round(statistics.median(firsts), 4),
        "n1_s": round(statistics.median(t1), 3),
        "n4_s": round(statistics.median(t4), 3),
        "n4_over_n1": round(statistics.median(t4) / statistics.median(t1), 3),
    }
