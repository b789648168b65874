"""The workbench's Compare tab: one prompt through the plain embedded model (asked for voices by a
system prompt) and the voices-tuned one, same seed and length, shown side by side: the pure
parts, and the tab itself (:func:`compare_tab`)."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr

from ..backends.base import Backend, GenerationRequest
from ..generate import Generation
from ..trace import Trace
from ..voices import VoiceSet, resolve_voice_set
from .colors import VoiceColors
from .common import fail
from .config import ServeConfig

LABELS = ("plain + voice prompt", "tuned (embedded-voices)")
MAX_PROMPT_CHARS = 4000


def llamacpp_pair() -> tuple[Backend, Backend]:
    """The plain embedded model and the voices-tuned one (loads both; slow the first time)."""
    from ..backends import create_backend

    return create_backend("llamacpp"), create_backend("llamacpp", model="embedded-voices")


class BackendPair:
    """Makes the two backends once, on first use, and keeps them for the app's lifetime."""

    def __init__(self, factory: Callable[[], tuple[Backend, Backend]] = llamacpp_pair) -> None:
        self.factory = factory
        self._pair: tuple[Backend, Backend] | None = None
        self._lock = threading.Lock()

    def get(self) -> tuple[Backend, Backend]:
        """The cached pair (each backend has its own lock around generation)."""
        with self._lock:
            if self._pair is None:
                self._pair = self.factory()
            return self._pair


def requests(
    prompt: str, voices: VoiceSet, seed: int = 0, max_tokens: int = 120
) -> tuple[GenerationRequest, GenerationRequest]:
    """The plain model's request (voice system prompt first) and the tuned one's (prompt only),
    built by the library's conversation layer like every other reply."""
    from ..conversation import ChatSettings, build_request

    history = [("user", prompt)]
    plain_st = ChatSettings(model="embedded", seed=seed, max_tokens=max_tokens, alternatives=0)
    plain = build_request(plain_st, voices, history)
    tuned = build_request(replace(plain_st, model="embedded-voices"), voices, history)
    return plain, tuned


def run_pair(
    pair: tuple[Backend, Backend],
    prompt: str,
    voices: VoiceSet | str | None = "seed",
    seed: int = 0,
    max_tokens: int = 120,
) -> tuple[Trace, Trace]:
    """Generate with both backends (one after the other) and return the two traces."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("write a prompt first")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt too long ({len(prompt)} > {MAX_PROMPT_CHARS} characters)")
    vs = resolve_voice_set(voices)
    out: list[Trace] = []
    for backend, req in zip(pair, requests(prompt, vs, seed, max_tokens), strict=True):
        g = Generation(backend, req, vs)
        for _ in g:
            pass
        out.append(g.trace)
    return out[0], out[1]


def _span(seg: Any, ntok: int) -> tuple[int, int]:
    """A segment's token range [a, b) (empty when it owns no tokens)."""
    toks = [t for t in seg.tokens if 0 <= t < ntok] if ntok else []
    if not toks:
        return 0, 0
    return min(toks), max(toks) + 1


def lanes_frame(traces: tuple[Trace, Trace], voices: VoiceSet | str | None = "seed") -> Any:
    """Both replies' lanes as one pandas DataFrame for a scatter chart: a row per token (model,
    token index on the shared axis, voice), so the two replies line up token for token."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for label, tr in zip(LABELS, traces, strict=True):
        n = len(tr.tokens)
        for seg in tr.segments:
            a, b = _span(seg, n)
            rows.extend({"model": label, "token": t, "voice": seg.voice} for t in range(a, b))
    return pd.DataFrame(rows, columns=["model", "token", "voice"])


def summary_frame(traces: tuple[Trace, Trace]) -> Any:
    """Tokens per voice per model (the lanes in one stacked bar each), as a DataFrame."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for label, tr in zip(LABELS, traces, strict=True):
        n = len(tr.tokens)
        counts: dict[str, int] = {}
        for seg in tr.segments:
            a, b = _span(seg, n)
            if b > a:
                counts[seg.voice] = counts.get(seg.voice, 0) + (b - a)
        rows.extend({"model": label, "voice": v, "tokens": c} for v, c in counts.items())
    return pd.DataFrame(rows, columns=["model", "voice", "tokens"])


def voice_colors(
    traces: tuple[Trace, Trace], voices: VoiceSet | str | None = "seed"
) -> dict[str, str]:
    """The colour of every voice either reply used (declared ones theirs, others assigned)."""
    colors = VoiceColors(resolve_voice_set(voices))
    return {seg.voice: colors.color(seg.voice) for tr in traces for seg in tr.segments}


def reply_html(trace: Trace, voices: VoiceSet | str | None = "seed") -> str:
    """One reply as voice blocks (render_fragment escapes all text)."""
    from ..render.html import render_fragment

    vs = resolve_voice_set(voices)
    return render_fragment(trace, vs)


def compare_html(
    traces: tuple[Trace, Trace], voices: VoiceSet | str | None = "seed"
) -> tuple[str, str]:
    """HTML for the left and the right column (the lanes are charts: ``lanes_frame``)."""
    cols = tuple(
        f'<div class="tf-cmp-col" data-side="{side}"><h4>{html.escape(label)}</h4>'
        f"{reply_html(tr, voices)}</div>"
        for side, label, tr in zip(("plain", "tuned"), LABELS, traces, strict=True)
    )
    return cols[0], cols[1]


@dataclass
class CompareTab:
    """The Compare tab's components."""

    config: ServeConfig
    prompt: gr.Textbox
    run_btn: gr.Button
    lanes: gr.ScatterPlot
    summary: gr.BarPlot
    left: gr.HTML
    right: gr.HTML

    def wire(self) -> None:
        """Register Run (the button or Enter): one comparison at a time for the whole server."""
        voices = self.config.voices
        pair = BackendPair()

        def on_compare(text: str) -> tuple[Any, ...]:
            try:
                traces = run_pair(pair.get(), text, voices, seed=0, max_tokens=120)
            except Exception as e:  # a missing model or adapter is shown, not a crash
                raise fail(e) from None
            left, right = compare_html(traces, voices)
            colors = voice_colors(traces, voices)
            longest = max(len(t.tokens) for t in traces)
            return (
                left,
                right,
                gr.ScatterPlot(lanes_frame(traces), color_map=colors, x_lim=[0, max(1, longest)]),
                gr.BarPlot(summary_frame(traces), color_map=colors),
            )

        cmp_args: dict[str, Any] = {
            "fn": on_compare,
            "inputs": self.prompt,
            "outputs": [self.left, self.right, self.lanes, self.summary],
            "concurrency_id": "compare",
            "concurrency_limit": 1,
        }
        self.run_btn.click(**cmp_args)
        self.prompt.submit(**cmp_args)


def compare_tab(config: ServeConfig) -> CompareTab:
    """Lay out the Compare tab (call inside the page's ``gr.Tabs``)."""
    with gr.Tab("Compare", id="compare-tab"):
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                show_label=False,
                placeholder="One prompt for both models",
                elem_id="cmp-prompt",
                lines=1,
                max_lines=4,
                scale=8,
            )
            run_btn = gr.Button("Run", variant="primary", elem_id="cmp-run", scale=1)
        with gr.Row():
            lanes = gr.ScatterPlot(
                x="token",
                y="model",
                color="voice",
                title="Voices along the reply (one mark per token, shared axis)",
                height=200,
                scale=3,
                elem_id="cmp-lanes",
            )
            summary = gr.BarPlot(
                x="model",
                y="tokens",
                color="voice",
                title="Tokens per voice",
                height=200,
                scale=1,
                elem_id="cmp-summary",
            )
        with gr.Row():
            with gr.Column():
                left = gr.HTML(elem_id="cmp-left")
            with gr.Column():
                right = gr.HTML(elem_id="cmp-right")
    return CompareTab(config, prompt, run_btn, lanes, summary, left, right)


__all__ = [
    "LABELS",
    "BackendPair",
    "CompareTab",
    "compare_html",
    "compare_tab",
    "lanes_frame",
    "llamacpp_pair",
    "reply_html",
    "requests",
    "run_pair",
    "summary_frame",
    "voice_colors",
]
