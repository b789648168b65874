"""The workbench's Dataset tab as pure functions: open a dataset file, list its problems, draw its
statistics and one example's reply as voice blocks (all HTML escaped; colours validated)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.lines import DatasetError
from ..data.stats import dataset_stats
from ..data.validate import Issue, Report, validate
from ..voices import VoiceSet, resolve_voice_set
from .colors import safe_hex

# Caps keep one huge or broken file from flooding the page or the server's memory.
MAX_PROBLEMS = 500
MAX_EXAMPLES = 5000
MAX_REPLY_CHARS = 200_000


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


def _bar(frac: float, color: str) -> str:
    width = max(0.0, min(1.0, frac)) * 100
    return (
        f'<span style="display:inline-block;height:0.8em;width:{width:.1f}%;'
        f'background:{safe_hex(color)}"></span>'
    )


def voices_html(stats: dict[str, Any]) -> str:
    """Per-voice segments, examples, tokens and token share, with a bar in the voice's colour."""
    voices = stats.get("voices") or []
    if not voices:
        return "<p>No voices in the usable examples.</p>"
    top = max((float(v["share"]) for v in voices), default=0.0) or 1.0
    rows = "".join(
        f'<tr data-voice="{_esc(v["voice"])}"><td>{_esc(v["voice"])}</td>'
        f"<td>{int(v['segments'])}</td><td>{int(v['examples'])}</td><td>{int(v['tokens'])}</td>"
        f"<td>{float(v['share']) * 100:.1f}%</td>"
        f'<td style="width:40%">{_bar(float(v["share"]) / top, str(v["color"]))}</td></tr>'
        for v in voices
    )
    return (
        '<table class="tf-ds-voices"><thead><tr><th>voice</th><th>segments</th><th>examples</th>'
        f"<th>tokens</th><th>share</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    )


def lengths_html(stats: dict[str, Any]) -> str:
    """The reply-length histogram (approximate tokens) as a table with bars."""
    rt = stats.get("reply_tokens") or {}
    bins = rt.get("bins") or []
    if not bins:
        return "<p>No replies.</p>"
    top = max(int(b["count"]) for b in bins) or 1
    rows = "".join(
        f"<tr><td>{int(b['lo'])}–{'' if b['hi'] is None else int(b['hi'])}</td>"
        f"<td>{int(b['count'])}</td>"
        f'<td style="width:60%">{_bar(int(b["count"]) / top, "#4A7FB5")}</td></tr>'
        for b in bins
    )
    return (
        '<table class="tf-ds-lengths"><thead><tr><th>reply tokens</th><th>replies</th><th></th>'
        f"</tr></thead><tbody>{rows}</tbody></table>"
        f"<p>min {int(rt.get('min') or 0)}, max {int(rt.get('max') or 0)}, "
        f"mean {float(rt.get('mean') or 0):.1f}</p>"
    )


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
    return (
        f'<table class="tf-ds-transitions"><thead><tr><th>from \\ to</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def stats_html(view: DatasetView) -> str:
    """All statistics: totals, voices, reply lengths, transitions."""
    s = view.stats
    tok = s.get("tokens") or {}
    return (
        '<div class="tf-ds-stats">'
        f"<p>{int(s.get('examples') or 0)} examples, {int(s.get('replies') or 0)} replies, "
        f"{int(tok.get('total') or 0)} tokens ({_esc(tok.get('method', ''))})</p>"
        f"<h4>Voices</h4>{voices_html(s)}<h4>Reply length</h4>{lengths_html(s)}"
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


__all__ = [
    "DatasetView",
    "example_html",
    "lengths_html",
    "open_dataset",
    "problems_html",
    "stats_html",
    "summary_text",
    "transitions_html",
    "voices_html",
]
