"""``thoughtform bench ui``: how fast the workbench shows a long multi-voice reply in Chromium.

A replay backend plays a synthetic ``tokens``-token reply (8 voices, 5 alternatives per token)
as fast as it can; the page is real Chromium driven by Playwright. Measured:

- tokens/s displayed (first to last token applied to the DOM, browser clock);
- bytes per token on the wire over the first and the last 500 tokens: every SSE message of
  Gradio's ``queue/data`` stream is counted (a tee of the page's fetch body), attributed to the
  tokens it carried; CDP's ``Network.dataReceived`` gives the encoded total as a cross-check;
- renderer milliseconds per token over the same windows (work must not grow with length), and
  at a throttled ``rate`` the browser's whole main-thread time per token (CDP Performance);
- lag from the last token produced (server wall clock) to the last token displayed.
"""

from __future__ import annotations

import json as _json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from ..backends.replay import split_words
from ..trace import Alternative, TokenRecord, Trace

VOICES = ["Echo", "Doubt", "Pulse", "Thread", "Shift", "Inner", "Resonance", "Role"]
WORDS = "rain river light cold breath slow question answer voice thread turn ring".split()

# Runs before the app: tees Gradio's SSE stream so every message's size and content is seen.
_TEE = r"""
(() => {
  const orig = window.fetch.bind(window);
  window.__sse = [];
  window.fetch = async (...args) => {
    const resp = await orig(...args);
    const url = String(args[0] && args[0].url ? args[0].url : args[0]);
    if (!url.includes("/queue/data") || !resp.body) return resp;
    const [a, b] = resp.body.tee();
    (async () => {
      const reader = b.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let k;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          const msg = buf.slice(0, k);
          buf = buf.slice(k + 2);
          window.__sse.push([performance.now(), new TextEncoder().encode(msg).length + 2, msg]);
        }
      }
    })();
    return new Response(a, { status: resp.status, statusText: resp.statusText, headers: resp.headers });
  };
})();
"""


def synthetic_text(n_tokens: int, seed: int = 7) -> str:
    """A multi-voice reply of at least ``n_tokens`` word pieces."""
    rng = random.Random(seed)
    parts: list[str] = []
    n = 0
    while n < n_tokens:
        parts.append(f"[{rng.choice(VOICES)}] ")
        for _ in range(rng.randint(8, 40)):
            parts.append(rng.choice(WORDS) + " ")
        parts.append("\n")
        n = len(split_words("".join(parts)))
    return "".join(parts)


def synthetic_trace(n_tokens: int, seed: int = 7, alternatives: int = 5) -> Trace:
    """A trace of exactly ``n_tokens`` tokens with logprobs, alternatives and entropy."""
    rng = random.Random(seed)
    pieces = split_words(synthetic_text(n_tokens, seed))[:n_tokens]
    toks = []
    for i, w in enumerate(pieces):
        p = rng.uniform(0.05, 0.98)
        rest = 1 - p
        top = [Alternative(w, math.log(p), token_id=i)]
        for j in range(alternatives - 1):
            q = rest * rng.uniform(0.2, 0.6)
            rest -= q
            top.append(Alternative(rng.choice(WORDS), math.log(q), token_id=100_000 + j))
        ent = -sum(math.exp(a.logprob or 0) * (a.logprob or 0) for a in top) + rest * 3
        toks.append(
            TokenRecord(index=i, text=w, token_id=i, logprob=math.log(p), top=top, entropy=ent)
        )
    return Trace(meta={"kind": "generation", "title": "bench"}, tokens=toks)


def _payloads(obj: Any) -> list[dict[str, Any]]:
    """Our payloads inside one decoded Gradio message (wherever its diff put them)."""
    out: list[dict[str, Any]] = []
    if isinstance(obj, str):
        if obj.startswith('{"n":'):
            try:
                p = _json.loads(obj)
            except ValueError:
                return out
            if isinstance(p, dict) and isinstance(p.get("ev"), list):
                out.append(p)
    elif isinstance(obj, dict):
        for v in obj.values():
            out += _payloads(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _payloads(v)
    return out


def _window(rows: list[tuple[int, int, float]], n: int, last: bool) -> tuple[float, float]:
    """(bytes per token, ms per token) over the first (or last) ``n`` tokens of (tokens, bytes,
    ms) rows in stream order; a message straddling the edge counts in proportion."""
    seq = list(reversed(rows)) if last else rows
    toks = 0.0
    byts = 0.0
    ms = 0.0
    for k, b, t in seq:
        if k <= 0:
            if toks == 0 and not last:
                byts += b  # the opening message (user turn, reply header) belongs to the start
            continue
        take = min(k, n - toks)
        byts += b * take / k
        ms += t * take / k
        toks += take
        if toks >= n:
            break
    return (byts / toks if toks else math.nan, ms / toks if toks else math.nan)


def _busy(samples: list[tuple[int, float]], a: int, b: int) -> float | None:
    """Main-thread milliseconds per token while the shown count went from ~a to ~b (None when
    the reply streamed too fast to sample that window: use ``rate``)."""
    inside = [(n, t) for n, t in samples if a <= n <= b]
    before = [(n, t) for n, t in samples if n < a]
    after = [(n, t) for n, t in samples if n > b]
    pts = ([before[-1]] if before else []) + inside + ([after[0]] if after else [])
    if len(pts) < 3 or pts[-1][0] == pts[0][0]:
        return None
    return round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 4)


def bench_ui(tokens: int = 4000, json: bool = False, rate: float = 0.0) -> dict[str, Any]:
    """Stream a ``tokens``-token reply into Chromium and measure (see the module docstring).

    ``rate`` throttles the replay (tokens/s; 0 = as fast as possible). ``json`` is accepted for
    symmetry with the other benchmarks; the result is always a dict.
    """
    from playwright.sync_api import sync_playwright

    from ..ui.harness import Server, launch
    from ..ui.store import Store

    window = min(500, max(1, tokens // 4))
    with tempfile.TemporaryDirectory(prefix="tf-bench-ui-") as d:
        tmp = Path(d)
        trace_path = tmp / "bench.jsonl"
        synthetic_trace(tokens).save(trace_path)
        st = Store(tmp / "s.db")
        sid = st.create_session(
            "bench",
            settings={"backend": "replay", "max_tokens": tokens + 8, "alternatives": 5},
        )
        st.close()
        srv = Server(tmp / "s.db", replay=trace_path, model=None, rate=rate, backend="replay")
        try:
            with sync_playwright() as pw:
                br = launch(pw)
                ctx = br.new_context(viewport={"width": 1400, "height": 1000})
                ctx.add_init_script(_TEE)
                page = ctx.new_page()
                cdp = ctx.new_cdp_session(page)
                cdp.send("Network.enable")
                sse_ids: set[str] = set()
                wire = {"bytes": 0}

                def on_req(e: dict[str, Any]) -> None:
                    if "/queue/data" in e.get("request", {}).get("url", ""):
                        sse_ids.add(e["requestId"])

                def on_data(e: dict[str, Any]) -> None:
                    if e.get("requestId") in sse_ids:
                        wire["bytes"] += int(e.get("dataLength") or 0)

                cdp.on("Network.requestWillBeSent", on_req)
                cdp.on("Network.dataReceived", on_data)
                page.goto(srv.url + f"?session={sid}")
                page.wait_for_function(
                    "() => { const w = document.querySelector('#tf-wb'); return w && w.dataset.session; }",
                    timeout=60_000,
                )
                page.evaluate(
                    "() => { const s = window.thoughtform.current.stats; s.log = []; window.__sse = []; }"
                )
                wire["bytes"] = 0
                cdp.send("Performance.enable")
                samples: list[tuple[int, float]] = []
                t_send = time.time()
                box = page.locator("#prompt textarea")
                box.fill("bench")
                box.press("Enter")
                done_js = (
                    "() => document.querySelectorAll("
                    "'#tf-wb .tf-msg[data-role=assistant]:not([data-status=streaming])').length"
                )
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    # Main-thread busy time (script, style, layout, paint) against tokens shown.
                    m = {
                        x["name"]: x["value"] for x in cdp.send("Performance.getMetrics")["metrics"]
                    }
                    shown_now = int(
                        page.evaluate("+document.querySelector('#tf-wb').dataset.tokens")
                    )
                    samples.append((shown_now, float(m.get("TaskDuration", 0.0)) * 1000))
                    if page.evaluate(done_js) >= 1:
                        break
                    time.sleep(0.1)
                res = page.evaluate(
                    """() => { const s = window.thoughtform.current.stats;
                       return {tokens: s.tokens, firstAt: s.firstAt, lastAt: s.lastAt,
                               lastWall: s.lastWall, produced: s.producedLast, origin: performance.timeOrigin,
                               log: s.log, sse: window.__sse.map(m => [m[0], m[1], m[2]]),
                               nodes: document.querySelectorAll('#tf-wb *').length}; }"""
                )
                br.close()
        finally:
            srv.stop()
    rows: list[tuple[int, int, float]] = []
    ms_of = {e[4]: float(e[3]) for e in res["log"] if len(e) > 4}
    seen: set[Any] = set()
    for _t, size, msg in res["sse"]:
        data = msg.split("data:", 1)[1].strip() if "data:" in msg else ""
        try:
            decoded = _json.loads(data) if data else None
        except ValueError:
            decoded = None
        k = 0
        ms = 0.0
        for p in _payloads(decoded):
            if p.get("n") in seen:
                continue  # Gradio repeats the last value on completion: bytes count, tokens not
            seen.add(p.get("n"))
            k += sum(1 for e in p["ev"] if e and e[0] == "K")
            ms += ms_of.get(p.get("n"), 0.0)
        rows.append((k, size, ms))
    shown = int(res["tokens"])
    span_s = max(1e-9, (res["lastAt"] - res["firstAt"]) / 1000)
    b_first, ms_first = _window(rows, window, last=False)
    b_last, ms_last = _window(rows, window, last=True)
    first_wall = res["origin"] + res["firstAt"]
    busy_first = _busy(samples, 0, window)
    busy_last = _busy(samples, tokens - window, tokens)
    out: dict[str, Any] = {
        "tokens": tokens,
        "replay_rate": rate,
        "tokens_displayed": shown,
        "tokens_per_s_displayed": round(shown / span_s, 1),
        "tokens_per_s_send_to_last": round(shown / max(1e-9, res["lastWall"] / 1000 - t_send), 1),
        "first_token_latency_ms": round(first_wall - t_send * 1000, 1),
        "bytes_per_token_first": round(b_first, 1),
        "bytes_per_token_last": round(b_last, 1),
        "bytes_per_token_ratio": round(b_last / b_first, 3) if b_first else math.nan,
        "renderer_ms_per_token_first": round(ms_first, 4),
        "renderer_ms_per_token_last": round(ms_last, 4),
        "browser_busy_ms_per_token_first": busy_first,
        "browser_busy_ms_per_token_last": busy_last,
        "sse_messages": len(rows),
        "sse_bytes_total": sum(r[1] for r in rows),
        "sse_bytes_total_cdp": wire["bytes"],
        "lag_last_token_ms": (
            round(res["lastWall"] - res["produced"] * 1000, 1)
            if isinstance(res.get("produced"), (int, float))
            else None
        ),
        "dom_nodes": int(res["nodes"]),
        "window_tokens": window,
    }
    return out
