"""The workbench's Dataset tab as pure functions: open a dataset file, list its problems, give its
statistics as pandas frames for Gradio's charts, show one example's reply as voice blocks (all
HTML escaped; colours validated), and make a small sample dataset."""

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


__all__ = [
    "DatasetView",
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
