"""``thoughtform bench proxy``: what the proxy costs a client, against the same upstream direct.

Three measurements, each interleaved direct / through the proxy (medians of ``rounds``); every
server is its own process (``thoughtform proxy`` recording into a temporary database, as in use):

1. **Added latency per chunk**: a scripted upstream streams at 50 tokens/s, each token's text
   its own send time (``time.time_ns``), which the proxy passes through unchanged; the client
   subtracts it from the arrival time, so direct and proxied latency are measured on one clock.
2. **Ceiling**: the scripted upstream unthrottled; chunks/s the client receives.
3. **A real model**: the embedded model, decoded in this process (the ``llamacpp`` backend through
   ``Generation``, no HTTP) vs the same seeded request through ``thoughtform proxy --upstream
   embedded`` over HTTP; decode tok/s (tokens after the first / time since the first). Target:
   proxy >= 0.95x direct.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx

from ..procs import die_with_parent
from .upstream import read_stamps

PROMPT = "Tell me a long story about a lighthouse keeper who hears voices in the fog."
LATENCY_RATE = 50.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(cmd: list[str], ready_url: str, timeout: float = 180.0) -> Iterator[None]:
    """Run a server process until the block ends; wait until ``ready_url`` answers 200."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read()[-2000:].decode("utf-8", "replace")
                raise RuntimeError(f"{cmd[2:5]} exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after {timeout} s")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _upstream(port: int, rate: float, stamp: bool) -> contextlib.AbstractContextManager[None]:
    cmd = [sys.executable, "-m", "thoughtform.bench.upstream", "--port", str(port)]
    cmd += ["--rate", str(rate)] + (["--stamp"] if stamp else [])
    return _process(cmd, f"http://127.0.0.1:{port}/v1/models")


def _proxy(port: int, upstream: str, db: str) -> contextlib.AbstractContextManager[None]:
    cmd = [sys.executable, "-m", "thoughtform.cli", "proxy", "--upstream", upstream]
    cmd += ["--port", str(port), "--db", db]
    return _process(cmd, f"http://127.0.0.1:{port}/health")


def _stream(
    client: httpx.Client, url: str, body: dict[str, Any], usage: dict[str, Any] | None = None
) -> list[tuple[int, str]]:
    """POST a streaming chat request; (arrival time_ns, content) per content delta (and the
    final usage into ``usage``)."""
    out: list[tuple[int, str]] = []
    buf = b""
    with client.stream("POST", url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        for part in r.iter_raw():
            now = time.time_ns()
            buf += part
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                line = ev.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(f"stream error: {obj['error']}")
                if usage is not None and isinstance(obj.get("usage"), dict):
                    usage.update(obj["usage"])
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        out.append((now, text))
    return out


def _body(tokens: int, alternatives: int = 5) -> dict[str, Any]:
    # What the proxy itself asks of an upstream (logprobs for its recording), so that direct
    # requests cost the upstream the same.
    return {
        "model": "m",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": tokens,
        "logprobs": True,
        "top_logprobs": alternatives,
    }


def _latencies(got: list[tuple[int, str]]) -> list[float]:
    """Milliseconds from each stamped token's send to its arrival."""
    out = []
    for t_recv, text in got:
        for ns in read_stamps(text):
            out.append((t_recv - ns) / 1e6)
    return out


def _p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def _rate(got: list[tuple[int, str]], n: int) -> float:
    """Items after the first per second since the first."""
    if len(got) < 2 or got[-1][0] <= got[0][0]:
        return 0.0
    return (n - 1) / ((got[-1][0] - got[0][0]) / 1e9)


def bench_proxy(tokens: int = 200, rounds: int = 3) -> dict[str, Any]:
    """Latency per chunk, the chunk ceiling and model tok/s: direct vs through the proxy."""
    out: dict[str, Any] = {"tokens": tokens, "rounds": rounds}
    client = httpx.Client(timeout=600)
    with tempfile.TemporaryDirectory() as td:
        # 1. added latency per chunk
        up, px = _free_port(), _free_port()
        direct_url = f"http://127.0.0.1:{up}/v1"
        proxy_url = f"http://127.0.0.1:{px}/v1"
        lat: dict[str, list[float]] = {"direct": [], "proxy": []}
        with _upstream(up, LATENCY_RATE, True), _proxy(px, direct_url, f"{td}/a.db"):
            _stream(client, proxy_url, _body(10))  # warm-up (connections, first imports)
            for _ in range(rounds):
                for key, url in (("direct", direct_url), ("proxy", proxy_url)):
                    lat[key] += _latencies(_stream(client, url, _body(tokens)))
        for key in lat:
            out[f"latency_{key}_ms_median"] = round(statistics.median(lat[key]), 3)
            out[f"latency_{key}_ms_p95"] = round(_p95(lat[key]), 3)
        out["added_latency_ms_median"] = round(
            out["latency_proxy_ms_median"] - out["latency_direct_ms_median"], 3
        )
        out["added_latency_ms_p95"] = round(
            out["latency_proxy_ms_p95"] - out["latency_direct_ms_p95"], 3
        )

        # 2. the ceiling: an upstream as fast as it can
        up, px = _free_port(), _free_port()
        direct_url = f"http://127.0.0.1:{up}/v1"
        proxy_url = f"http://127.0.0.1:{px}/v1"
        ceil: dict[str, list[float]] = {"direct": [], "proxy": []}
        n = max(tokens, 2000)
        with _upstream(up, 0.0, False), _proxy(px, direct_url, f"{td}/b.db"):
            _stream(client, proxy_url, _body(10))
            for _ in range(rounds):
                for key, url in (("direct", direct_url), ("proxy", proxy_url)):
                    got = _stream(client, url, _body(n))
                    ceil[key].append(_rate(got, sum(len(t.split()) for _, t in got)))
        for key in ceil:
            out[f"ceiling_{key}_tok_s"] = round(statistics.median(ceil[key]), 1)

        # 3. a real model: in process vs through the proxy
        out.update(_bench_model(client, tokens, rounds, td))
    client.close()
    return out


def _bench_model(client: httpx.Client, tokens: int, rounds: int, td: str) -> dict[str, Any]:
    from ..backends.llamacpp import LlamaCppBackend  # isort: skip  (sets the OpenMP policy)
    from ..backends import GenerationRequest, Message, Sampling
    from ..generate import Generation
    from ..voices import PRESETS

    px = _free_port()
    proxy_url = f"http://127.0.0.1:{px}/v1"
    sampling = {"temperature": 0.8, "top_p": 0.95, "top_k": 40}
    direct: list[float] = []
    proxied: list[float] = []
    first: dict[str, list[float]] = {"direct": [], "proxy": []}
    backend = LlamaCppBackend()

    def run_direct(seed: int) -> float:
        req = GenerationRequest(
            messages=(Message("user", PROMPT),),
            sampling=Sampling(seed=seed, max_tokens=tokens, **sampling),  # type: ignore[arg-type]
            alternatives=5,
        )
        t0 = time.perf_counter()
        times: list[float] = []
        for upd in Generation(backend, req, PRESETS["seed"]):
            if upd.token is not None:
                times.append(time.perf_counter())
        first["direct"].append(times[0] - t0)
        return (len(times) - 1) / (times[-1] - times[0])

    def run_proxy(seed: int) -> float:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "max_tokens": tokens,
            "seed": seed,
            "stream_options": {"include_usage": True},
            **sampling,
        }
        t0 = time.time_ns()
        use: dict[str, Any] = {}
        got = _stream(client, proxy_url, body, use)
        first["proxy"].append((got[0][0] - t0) / 1e9)
        return _rate(got, int(use.get("completion_tokens") or len(got)))

    try:
        with _proxy(px, "embedded", f"{td}/c.db"):
            run_direct(0)
            run_proxy(0)
            for k in first:
                first[k].clear()
            for r in range(rounds):
                direct.append(run_direct(100 + r))
                proxied.append(run_proxy(100 + r))
    finally:
        backend.close()
    d, p = statistics.median(direct), statistics.median(proxied)
    return {
        "model_direct_tok_s": round(d, 2),
        "model_proxy_tok_s": round(p, 2),
        "model_ratio": round(p / d, 3),
        "model_target_ratio": 0.95,
        "model_direct_first_token_s": round(statistics.median(first["direct"]), 3),
        "model_proxy_first_token_s": round(statistics.median(first["proxy"]), 3),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
