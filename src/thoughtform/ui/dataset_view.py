"""The workbench's Dataset tab as pure functions: open a dataset file, list its problems, give its
statistics as pandas frames for Gradio's charts, show one example's reply as voice blocks (all
HTML escaped; colours validated), and make a small sample dataset; and the tab itself
(:func:`dataset_tab`)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ..data.lines import DatasetError
from ..data.stats import dataset_stats
from ..data.validate import Issue, Report, validate
from ..voices import VoiceSet, resolve_voice_set
from .colors import safe_hex
from .common import fail, plain
from .config import ServeConfig, is_loopback
from .service import Workbench, WorkbenchError

# Caps keep one huge or broken file from flooding the page or the server's memory.
MAX_PROBLEMS = 500
MAX_EXAMPLES = 5000
MAX_REPLY_CHARS = 200_000
SAMPLE_EXAMPLES = 40


@dataclass
class DatasetView:
    """What the Dataset tab shows about one file."""

    path: str
    report: Report
    issues: list[Issue] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, reply)


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _examples(path: str, vs: VoiceSet) -> list[tuple[str, str]]:
    """(last user message, last assistant reply) of each usable example, up to MAX_EXAMPLES."""
    from ..data.validate import iter_dataset

    out: list[tuple[str, str]] = []
    for e in iter_dataset([path], vs):
        if not e.ok or e.record is None:
            continue
        prompt = reply = ""
        for m in e.record.messages:
            if m.get("role") == "assistant":
                reply = m.get("content", "")
            elif m.get("role") == "user":
                prompt = m.get("content", "")
        if reply:
            out.append((prompt[:MAX_REPLY_CHARS], reply[:MAX_REPLY_CHARS]))
        if len(out) >= MAX_EXAMPLES:
            break
    return out


def open_dataset(path: str | Path, voices: VoiceSet | str | None = "seed") -> DatasetView:
    """Validate, count and index ``path``; raise DatasetError when it cannot be read."""
    p = str(path or "").strip()
    if not p:
        raise DatasetError("give a dataset file path")
    vs = resolve_voice_set(voices)
    issues: list[Issue] = []

    def keep(i: Issue) -> None:
        if len(issues) < MAX_PROBLEMS:
            issues.append(i)

    report = validate(p, vs, on_issue=keep)
    stats = dataset_stats(p, vs)
    return DatasetView(p, report, issues, stats, _examples(p, vs))


def summary_text(view: DatasetView) -> str:
    """One plain line: examples, bad lines, errors and warnings."""
    r = view.report
    more = " (first shown)" if r.errors + r.warnings > len(view.issues) else ""
    return (
        f"{r.checked} entries, {r.examples} usable examples, {r.bad_lines} bad lines, "
        f"{r.errors} errors, {r.warnings} warnings{more}"
    )


def problems_html(view: DatasetView) -> str:
    """The problems as an escaped table of ``PATH:LINE: reason`` lines."""
    if not view.issues:
        return '<p class="tf-ds-ok">No problems found.</p>'
    rows = "".join(
        f'<tr class="tf-ds-{_esc(i.severity)}"><td><code>{_esc(i.format())}</code></td></tr>'
        for i in view.issues
    )
    return f'<table class="tf-ds-problems"><tbody>{rows}</tbody></table>'


def voices_frame(stats: dict[str, Any]) -> Any:
    """Per-voice statistics as a pandas DataFrame (voice, segments, examples, tokens, share %),
    in the voice set's lane order: the rows of the table and the bars of the share chart."""
    import pandas as pd

    rows = [
        {
            "voice": str(v["voice"]),
            "segments": int(v["segments"]),
            "examples": int(v["examples"]),
            "tokens": int(v["tokens"]),
            "share": round(float(v["share"]) * 100, 1),
        }
        for v in stats.get("voices") or []
    ]
    return pd.DataFrame(rows, columns=["voice", "segments", "examples", "tokens", "share"])


def voice_colors(stats: dict[str, Any]) -> dict[str, str]:
    """Each voice's validated colour, for the charts' colour map."""
    return {str(v["voice"]): safe_hex(v.get("color")) for v in stats.get("voices") or []}


def lengths_frame(stats: dict[str, Any]) -> Any:
    """The reply-length histogram (approximate tokens) as a DataFrame: one row per bin."""
    import pandas as pd

    bins = (stats.get("reply_tokens") or {}).get("bins") or []
    rows = [
        {
            "reply tokens": f"{int(b['lo'])}–{'' if b['hi'] is None else int(b['hi'])}",
            "replies": int(b["count"]),
        }
        for b in bins
    ]
    return pd.DataFrame(rows, columns=["reply tokens", "replies"])


def lengths_text(stats: dict[str, Any]) -> str:
    """One line under the length chart: min, max and mean reply length."""
    rt = stats.get("reply_tokens") or {}
    if not rt.get("bins"):
        return "No replies."
    return (
        f"reply tokens: min {int(rt.get('min') or 0)}, max {int(rt.get('max') or 0)}, "
        f"mean {float(rt.get('mean') or 0):.1f}"
    )


def sample_dataset(directory: str | Path, voices: VoiceSet | str | None = "seed") -> Path:
    """A small dataset for trying the tab without a file of one's own: ``dataset synth``'s
    output (40 examples, seed 0) written into ``directory``."""
    from ..data.synth import write_synth

    out = Path(directory) / "sample-synth.jsonl"
    write_synth(out, voices, n=SAMPLE_EXAMPLES, seed=0)
    return out


def transitions_html(stats: dict[str, Any]) -> str:
    """The voice-to-voice transition counts as an escaped matrix (rows: from, columns: to)."""
    tr = stats.get("transitions") or {}
    names = [str(n) for n in tr.get("voices") or []]
    matrix = tr.get("matrix") or []
    if not names:
        return "<p>No transitions.</p>"
    head = "".join(f"<th>{_esc(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{_esc(a)}</th>" + "".join(f"<td>{int(c)}</td>" for c in row) + "</tr>"
        for a, row in zip(names, matrix, strict=False)
    )
    # Many voices make a wide table: it scrolls sideways instead of being cut off.
    return (
        '<div class="tf-scroll-x"><table class="tf-ds-transitions"><thead><tr>'
        f"<th>from \\ to</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def stats_html(view: DatasetView) -> str:
    """The totals line and the transition matrix (voices and lengths are charts of their own)."""
    s = view.stats
    tok = s.get("tokens") or {}
    return (
        '<div class="tf-ds-stats">'
        f"<p>{int(s.get('examples') or 0)} examples, {int(s.get('replies') or 0)} replies, "
        f"{int(tok.get('total') or 0)} tokens ({_esc(tok.get('method', ''))})</p>"
        f"<h4>Transitions</h4>{transitions_html(s)}</div>"
    )


def example_html(view: DatasetView, index: int, voices: VoiceSet | str | None = "seed") -> str:
    """Example ``index`` (0-based, clamped): its prompt escaped, its reply as voice blocks."""
    from ..render import trace_from_text
    from ..render.html import render_fragment

    if not view.examples:
        return "<p>No usable examples.</p>"
    k = max(0, min(int(index), len(view.examples) - 1))
    prompt, reply = view.examples[k]
    vs = resolve_voice_set(voices)
    return (
        f'<div class="tf-ds-example" data-index="{k}">'
        f'<p class="tf-ds-prompt"><strong>Prompt:</strong> {_esc(prompt)}</p>'
        f"{render_fragment(trace_from_text(reply, vs), vs)}</div>"
    )


@dataclass
class DatasetTab:
    """The Dataset tab's components."""

    wb: Workbench
    config: ServeConfig
    path: gr.Textbox
    open_btn: gr.Button
    sample_btn: gr.Button
    upload: gr.File
    state: gr.State  # the open DatasetView
    summary: gr.Markdown
    problems: gr.HTML
    stats: gr.HTML
    shares: gr.BarPlot
    lengths: gr.BarPlot
    voices: gr.Dataframe
    index: gr.Number
    example: gr.HTML

    def wire(self) -> None:
        """Register open (a server path, the sample, an upload) and the example browser."""
        wb, config = self.wb, self.config

        def on_ds_path(path: str | None) -> list[Any]:
            # A typed path reads any file the server can (the sessions database of every user
            # included): only for one person's workbench, on loopback without a login.
            if not is_loopback(config.host) or wb.scoped:
                raise fail(
                    WorkbenchError("server paths only on loopback without a login; upload the file")
                )
            return on_ds_open(path)

        def on_ds_open(path: str | None) -> list[Any]:
            try:
                view = open_dataset(path or "", config.voices)
            except (DatasetError, OSError, ValueError) as e:
                raise fail(e) from None
            top = max(0, len(view.examples) - 1)
            frame = voices_frame(view.stats)
            order = list(frame["voice"])
            return [
                view,
                plain(summary_text(view)),
                problems_html(view),
                stats_html(view),
                gr.BarPlot(frame, color_map=voice_colors(view.stats), sort=order),
                frame,
                gr.BarPlot(
                    lengths_frame(view.stats),
                    sort=list(lengths_frame(view.stats)["reply tokens"]),
                    caption=lengths_text(view.stats),
                ),
                gr.update(maximum=top, value=0),
                example_html(view, 0, config.voices),
            ]

        def on_ds_sample() -> list[Any]:
            # Made now by ``dataset synth`` (40 examples) in this server's private directory.
            try:
                path = sample_dataset(wb.new_export_dir(), config.voices)
            except (OSError, ValueError) as e:
                raise fail(e) from None
            return [str(path), *on_ds_open(str(path))]

        def on_ds_index(view: Any, index: float | None) -> str:
            if view is None:
                return ""
            return example_html(view, int(index or 0), config.voices)

        outputs = [
            self.state,
            self.summary,
            self.problems,
            self.stats,
            self.shares,
            self.voices,
            self.lengths,
            self.index,
            self.example,
        ]
        self.sample_btn.click(on_ds_sample, None, [self.path, *outputs])
        self.open_btn.click(on_ds_path, self.path, outputs)
        self.path.submit(on_ds_path, self.path, outputs)
        self.upload.upload(on_ds_open, self.upload, outputs)
        self.index.change(
            on_ds_index, [self.state, self.index], self.example, show_progress="hidden"
        )


def dataset_tab(wb: Workbench, config: ServeConfig) -> DatasetTab:
    """Lay out the Dataset tab (call inside the page's ``gr.Tabs``)."""
    with gr.Tab("Dataset", id="dataset-tab"):
        with gr.Row(equal_height=True):
            path = gr.Textbox(
                label="Dataset file on the server (.jsonl or transcript)",
                elem_id="ds-path",
                max_lines=1,
                scale=6,
            )
            open_btn = gr.Button("Open", variant="primary", elem_id="ds-open", scale=1)
            sample_btn = gr.Button("Try a sample dataset", elem_id="ds-sample", scale=1, size="sm")
        upload = gr.File(
            label="…or upload one",
            file_types=[".jsonl", ".txt", ".md"],
            type="filepath",
            elem_id="ds-upload",
        )
        state = gr.State(None)
        summary = gr.Markdown(elem_id="ds-summary")
        with gr.Row():
            with gr.Column():
                problems = gr.HTML(elem_id="ds-problems", label="Problems")
            with gr.Column():
                stats = gr.HTML(elem_id="ds-stats", label="Statistics")
        with gr.Row():
            shares = gr.BarPlot(
                x="voice",
                y="share",
                color="voice",
                y_title="share of voiced tokens (%)",
                y_lim=[0, None],
                title="Voices",
                elem_id="ds-shares",
            )
            lengths = gr.BarPlot(
                x="reply tokens",
                y="replies",
                title="Reply length (approximate tokens)",
                elem_id="ds-lengths",
            )
        voices = gr.Dataframe(label="Per voice", interactive=False, elem_id="ds-voices", wrap=True)
        index = gr.Number(
            value=0,
            precision=0,
            minimum=0,
            label="Example number (from 0)",
            elem_id="ds-index",
            interactive=True,
        )
        example = gr.HTML(elem_id="ds-example")
    return DatasetTab(
        wb,
        config,
        path,
        open_btn,
        sample_btn,
        upload,
        state,
        summary,
        problems,
        stats,
        shares,
        lengths,
        voices,
        index,
        example,
    )


__all__ = [
    "DatasetTab",
    "DatasetView",
    "dataset_tab",
    "example_html",
    "lengths_frame",
    "lengths_text",
    "open_dataset",
    "problems_html",
    "sample_dataset",
    "stats_html",
    "summary_text",
    "transitions_html",
    "voice_colors",
    "voices_frame",
]
