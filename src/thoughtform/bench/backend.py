"""``thoughtform bench backend``: telemetry cost on the embedded model, side by side.

One process, interleaved rounds (the order rotates each round): (a) plain llama-cpp-python
streaming, no telemetry; (b) its own logprobs (``logits_all=True``, 5 alternatives); (c)
thoughtform's ``llamacpp`` backend with full telemetry (10 alternatives, exact entropy, voice
parsing, trace written to disk) on its owned decode loop; (d) the same on ``embedded-voices`` as
the merged, requantized model from the user cache; (e) the same on ``embedded-voices`` with the
adapter applied at run time. The medians of decode tokens/s are compared: d/c (the merged
voices model against the base, target >= 0.9) and e/c; c/a (target >= 0.97) is measured again
with (c) and (a) in lockstep, one token of each in turn (:func:`lockstep`), which the host's
drift cannot tilt; there (c) scores who-speaks-next in line, so that none of its work runs on a
thread beside the plain stream's steps. The transformers backend
is measured in child processes (with and without attention capture) so that each one's peak
memory is its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROMPT = "Tell me a long story about a lighthouse keeper who hears voices in the fog."


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


_END = object()  # what next() gives for a stream that has ended


def lockstep(a: Iterator[Any], b: Iterator[Any], tokens: Any) -> tuple[float, float]:
    """Tokens/s of two streams stepped in turn, one item of each (their first items, the
    prompt evaluation, apart), so that the host's drift falls on both alike: on this shared
    machine one stream's speed moves 10-20% between runs a few seconds apart, while two streams
    in lockstep keep their ratio within ~1%. ``tokens(item)``: how many tokens an item holds.
    Both run on this thread; work a stream leaves to threads of its own (the side scorer)
    slows the other stream's steps too while it runs."""
    its = (a, b)
    spent = [0.0, 0.0]
    count = [0, 0]
    live = [True, True]
    for it in its:
        next(it)
    while any(live):
        for i, it in enumerate(its):
            if not live[i]:
                continue
            t = time.perf_counter()
            item = next(it, _END)
            spent[i] += time.perf_counter() - t
            if item is _END:
                live[i] = False
            else:
                count[i] += tokens(item)
    return count[0] / spent[0], count[1] / spent[1]


def bench_backend(
    tokens: int = 0,
    rounds: int = 3,
    transformers: bool = True,
    n_ctx: int = 2048,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure decode tokens/s of (a) plain, (b) native logprobs, (c) thoughtform telemetry,
    (d) embedded-voices merged and (e) embedded-voices with the runtime LoRA."""
    # Our backend module first: it sets the OpenMP wait policy before llama_cpp loads, and the
    # plain and native runs share that process-wide setting (a fair comparison).
    from ..backends.llamacpp import LlamaCppBackend, decode_threads  # isort: skip
    from llama_cpp import Llama

    from ..adapters.merged import merged_voices_model
    from ..backends import GenerationRequest, Message, Sampling
    from ..backends import logits as L
    from ..generate import Generation
    from ..models import EMBEDDED_VOICES, embedded_gguf_path
    from ..prompting import voice_system_prompt
    from ..voices import PRESETS

    n = tokens or 200
    path = str(embedded_gguf_path())
    threads = threads or decode_threads()
    vs = PRESETS["seed"]
    messages = (Message("system", voice_system_prompt(vs)), Message("user", PROMPT))

    rss0 = _rss_mb()
    ours = LlamaCppBackend(path, n_ctx=n_ctx, n_threads=threads)
    # All decode with the same thread count (the backend's default unless --threads).
    rss_ours = _rss_mb() - rss0
    prompt_text = ours.chat_prompt(GenerationRequest(messages=messages))

    rss1 = _rss_mb()
    plain = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, verbose=False)
    rss_plain = _rss_mb() - rss1
    rss2 = _rss_mb()
    native = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)
    rss_native = _rss_mb() - rss2

    # The merged model is built here if the cache lacks it (seconds, once), outside the timing.
    t_merge = time.perf_counter()
    merged_path = merged_voices_model()
    merge_s = time.perf_counter() - t_merge
    voices = {
        "lora": LlamaCppBackend(EMBEDDED_VOICES, n_ctx=n_ctx, n_threads=threads, merged=False)
    }
    if merged_path is not None:
        voices["merged"] = LlamaCppBackend(EMBEDDED_VOICES, n_ctx=n_ctx, n_threads=threads)
    backends = {"telemetry": ours, **{f"voices_{k}": b for k, b in voices.items()}}

    # Each run reports decode speed: tokens after the first over the time since the first.
    # Prompt evaluation (which create_completion may skip through its prefix cache, while a
    # seeded request to our backend re-evaluates for repeatability) is reported apart.
    keys = ["plain", "native", *backends]
    first: dict[str, list[float]] = {k: [] for k in keys}
    counts: dict[str, list[int]] = {k: [] for k in keys}

    def ours_request(seed: int) -> GenerationRequest:
        return GenerationRequest(
            messages=messages,
            sampling=Sampling(temperature=0.8, top_p=0.95, top_k=40, seed=seed, max_tokens=n),
            alternatives=10,
        )

    def completion(llm: Any, seed: int, logprobs: int | None = None) -> Iterator[Any]:
        """llama-cpp-python's streamed completion, with the sampling ours_request asks."""
        return llm.create_completion(
            prompt_text,
            max_tokens=n,
            temperature=0.8,
            top_p=0.95,
            top_k=40,
            min_p=0.0,
            seed=seed,
            logprobs=logprobs,
            stream=True,
        )

    def run_llama(llm: Any, seed: int, logprobs: int | None, key: str) -> float:
        llm.set_seed(seed)
        t0 = time.perf_counter()
        t1 = 0.0
        count = 0
        for chunk in completion(llm, seed, logprobs):
            if not count:
                t1 = time.perf_counter()
            lp = chunk["choices"][0].get("logprobs")
            count += len(lp["tokens"]) if lp else 1
        first[key].append(t1 - t0)
        counts[key].append(count)
        return (count - 1) / (time.perf_counter() - t1)

    def run_ours(key: str, seed: int, trace_dir: str) -> float:
        trace_path = os.path.join(trace_dir, f"{key}-{seed}.jsonl")
        trace = Generation(backends[key], ours_request(seed), vs, trace_path=trace_path).run()
        assert trace.finish is not None
        t_first = trace.tokens[0].t or 0.0
        first[key].append(t_first)
        counts[key].append(len(trace.tokens))
        # The trace's end time includes the parser flush and the trace file's close.
        return (len(trace.tokens) - 1) / (trace.finish["timings"]["total_s"] - t_first)

    def run(key: str, seed: int, trace_dir: str) -> float:
        if key == "plain":
            return run_llama(plain, seed, None, key)
        if key == "native":
            return run_llama(native, seed, 5, key)
        return run_ours(key, seed, trace_dir)

    def paired(seed: int, trace_dir: str) -> tuple[float, float]:
        """(c) and (a) in lockstep, token for token."""
        trace_path = os.path.join(trace_dir, f"lockstep-{seed}.jsonl")
        gen = Generation(ours, ours_request(seed), vs, trace_path=trace_path)
        chunks = completion(plain, seed)

        def tokens(item: Any) -> int:
            if isinstance(item, dict):  # a completion chunk; the last only says why it ended
                return 0 if item["choices"][0].get("finish_reason") else 1
            return 1 if getattr(item, "token", None) is not None else 0

        return lockstep(iter(gen), iter(chunks), tokens)

    res: dict[str, list[float]] = {k: [] for k in keys}
    pairs: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as td:
        # Warm-up: first calls pay for page faults and graph allocation.
        for k in keys:
            run(k, 0, td)
        for k in keys:
            first[k].clear()
            counts[k].clear()
        for r in range(rounds):
            # Rotate the order so that no variant always runs right after the same other one
            # (on a shared machine, load changes within a round).
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for k in order:
                res[k].append(run(k, 100 + r, td))
        # In lockstep the side scorer's batch (who-speaks-next, on a thread of its own) would
        # slow the plain stream's steps as much as ours: scored in line instead, all of its
        # cost lands on (c), the conservative reading.
        side, ours.side_scoring = ours.side_scoring, False
        try:
            for r in range(rounds):
                pairs.append(paired(200 + r, td))
        finally:
            ours.side_scoring = side
    plain.close()
    native.close()
    for b in backends.values():
        b.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    p, nat, tel = med["plain"], med["native"], med["telemetry"]
    out: dict[str, Any] = {
        "tokens": n,
        "rounds": rounds,
        "threads": threads,
        "scan_kernel": L.kernel(),  # the compiled pass over each step's logits, or numpy
        "plain_tok_s": round(p, 2),
        "native_logprobs_tok_s": round(nat, 2),
        "telemetry_tok_s": round(tel, 2),
        # The target's ratio: (c) and (a) token for token in lockstep (median of the rounds);
        # the rounds' own ratio (whole runs in turn) moves with the host between runs.
        "ratio_vs_plain": round(statistics.median(c / a for c, a in pairs), 3),
        "lockstep_ratios": [round(c / a, 3) for c, a in pairs],
        "lockstep_telemetry_tok_s": round(statistics.median(c for c, _ in pairs), 2),
        "lockstep_plain_tok_s": round(statistics.median(a for _, a in pairs), 2),
        "ratio_vs_plain_rounds": round(tel / p, 3),
        "ratio_vs_native": round(tel / nat, 3),
        "plain_load_rss_mb": round(rss_plain, 1),
        "native_load_rss_mb": round(rss_native, 1),
        "telemetry_load_rss_mb": round(rss_ours, 1),
        "plain_first_token_s": round(statistics.median(first["plain"]), 3),
        "native_first_token_s": round(statistics.median(first["native"]), 3),
        "telemetry_first_token_s": round(statistics.median(first["telemetry"]), 3),
    }
    for k in ("voices_merged", "voices_lora"):
        if k in med:
            out[f"{k}_tok_s"] = round(med[k], 2)
            out[f"{k}_ratio_vs_base"] = round(med[k] / tel, 3)
            out[f"{k}_first_token_s"] = round(statistics.median(first[k]), 3)
    if "voices_merged" in med:
        out["voices_merged_vs_lora"] = round(med["voices_merged"] / med["voices_lora"], 3)
        out["voices_merged_model"] = str(merged_path)
    else:
        out["voices_merged_error"] = "no merged model (THOUGHTFORM_NO_MERGE set or build failed)"
    out["voices_merge_lookup_s"] = round(merge_s, 3)  # a cache hit costs ~1 ms; a build seconds
    out["tokens_per_run"] = {k: statistics.median(v) for k, v in counts.items()}
    if transformers:
        out.update(_bench_transformers(min(n, 64)))
    return out


def _bench_transformers(n: int) -> dict[str, Any]:
    """tok/s and peak RSS of the transformers backend, each variant in its own process."""
    out: dict[str, Any] = {}
    for attention in (False, True):
        code = (
            "import json,sys;from thoughtform.backends.transformers import bench_transformers;"
            f"print(json.dumps(bench_transformers(tokens={n}, attention={attention})))"
        )
        key = "hf_attention" if attention else "hf"
        try:
            cp = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=1800
            )
            data = json.loads(cp.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError):
            out[f"{key}_error"] = "transformers benchmark failed (is the hf extra installed?)"
            continue
        out[f"{key}_tok_s"] = data.get("tok_s")
        out[f"{key}_peak_rss_mb"] = data.get("peak_rss_mb")
        if attention and "attention_bytes_per_token" in data:
            out["hf_attention_bytes_per_token"] = data["attention_bytes_per_token"]
    return out
