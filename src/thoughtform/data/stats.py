"""Dataset statistics: examples, tokens, per-voice shares, voice orders, transitions, lengths."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..metrics import transition_matrix
from ..parse import Segment
from ..voices import VoiceSet, resolve_voice_set
from . import formats as F
from .lines import DEFAULT_MAX_LINE_BYTES
from .validate import Report, iter_dataset

if TYPE_CHECKING:
    from rich.console import Console

TokenCounter = Callable[[str], int]

# Approximate tokens: words and single punctuation marks (close to BPE counts for English prose).
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Reply-length bins (tokens): powers of two, so one table covers chit-chat and long essays.
BIN_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TOP_ORDERS = 10


def approx_tokens(text: str) -> int:
    """Approximate token count: words plus punctuation marks."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def hf_token_counter(path: str) -> TokenCounter:
    """A counter from a local Hugging Face tokenizer directory (never downloads)."""
    from transformers import AutoTokenizer  # heavy: only when asked for

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return lambda s: len(tok.encode(s, add_special_tokens=False))


class _Acc:
    """Running totals; memory depends on the number of voices and orders, not on the file size."""

    def __init__(self, vs: VoiceSet, count: TokenCounter) -> None:
        self.vs = vs
        self.count = count
        self.examples = 0
        self.messages = 0
        self.replies = 0
        self.roles: Counter[str] = Counter()
        self.tokens = 0
        self.reply_tokens = 0
        self.seg_count: Counter[str] = Counter()
        self.seg_tokens: Counter[str] = Counter()
        self.voice_examples: Counter[str] = Counter()
        self.first_seen: dict[str, int] = {}
        self.orders: Counter[tuple[str, ...]] = Counter()
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.per_reply: Counter[int] = Counter()
        self.bins = [0] * len(BIN_EDGES)
        self.len_min: int | None = None
        self.len_max = 0

    def add(self, rec: F.Record) -> None:
        self.examples += 1
        seen: set[str] = set()
        for m in rec.messages:
            self.messages += 1
            self.roles[m["role"]] += 1
            self.tokens += self.count(m["content"])
        for segs in rec.replies:
            self._reply(segs, seen)
        for v in seen:
            self.voice_examples[v] += 1
        for m in rec.messages:
            if m["role"] == "assistant":
                n = self.count(m["content"])
                self.reply_tokens += n
                self._length(n)

    def _reply(self, segs: list[Segment], seen: set[str]) -> None:
        self.replies += 1
        order: list[str] = []
        for s in segs:
            if not s.text:
                continue
            self.first_seen.setdefault(s.voice, len(self.first_seen))
            self.seg_count[s.voice] += 1
            self.seg_tokens[s.voice] += self.count(s.text)
            order.append(s.voice)
            seen.add(s.voice)
        self.orders[tuple(order)] += 1
        self.per_reply[len(set(order))] += 1
        names, matrix = transition_matrix(segs)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if matrix[i][j]:
                    self.transitions[(a, b)] += matrix[i][j]

    def _length(self, n: int) -> None:
        k = 0
        while k + 1 < len(BIN_EDGES) and n >= BIN_EDGES[k + 1]:
            k += 1
        self.bins[k] += 1
        self.len_min = n if self.len_min is None else min(self.len_min, n)
        self.len_max = max(self.len_max, n)

    def voice_order(self) -> list[str]:
        """Voices seen, in lane order (the default voice first), then first-seen order."""
        return sorted(self.first_seen, key=lambda v: (self.vs.voice(v).lane, self.first_seen[v]))

    def result(self, report: Report, method: str) -> dict[str, Any]:
        total_voice_tokens = sum(self.seg_tokens.values())
        voices = [
            {
                "voice": v,
                "color": self.vs.color_of(v),
                "declared": self.vs.get(v) is not None or v == self.vs.default_voice,
                "segments": self.seg_count[v],
                "examples": self.voice_examples[v],
                "tokens": self.seg_tokens[v],
                "share": (self.seg_tokens[v] / total_voice_tokens) if total_voice_tokens else 0.0,
            }
            for v in self.voice_order()
        ]
        names = [v for v in self.voice_order() if any(v in k for k in self.transitions)]
        matrix = [[self.transitions[(a, b)] for b in names] for a in names]
        last = max((k for k, n in enumerate(self.bins) if n), default=-1)
        bins = [
            {
                "lo": BIN_EDGES[k],
                "hi": (BIN_EDGES[k + 1] - 1) if k + 1 < len(BIN_EDGES) else None,
                "count": self.bins[k],
            }
            for k in range(last + 1)
        ]
        return {
            "examples": self.examples,
            "skipped": sum(report.skipped.values()),
            "skipped_reasons": dict(report.skipped.most_common()),
            "messages": self.messages,
            "replies": self.replies,
            "roles": dict(self.roles.most_common()),
            "tokens": {
                "method": method,
                "total": self.tokens,
                "assistant": self.reply_tokens,
                "in_voices": total_voice_tokens,
            },
            "voices": voices,
            "voices_per_reply": {str(k): n for k, n in sorted(self.per_reply.items())},
            "orders": [
                {"order": list(o), "count": n} for o, n in self.orders.most_common(TOP_ORDERS)
            ],
            "distinct_orders": len(self.orders),
            "transitions": {"voices": names, "matrix": matrix},
            "reply_tokens": {
                "bins": bins,
                "min": self.len_min if self.len_min is not None else 0,
                "max": self.len_max,
                "mean": (self.reply_tokens / self.replies) if self.replies else 0.0,
            },
        }


def dataset_stats(
    paths: Iterable[str | Path] | str | Path,
    voices: VoiceSet | str | None = "seed",
    tokenizer: TokenCounter | None = None,
    strict: bool = False,
    fmt: F.Format | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> dict[str, Any]:
    """Statistics over the valid examples of ``paths`` as a plain, JSON-ready dict."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    vs = resolve_voice_set(voices)
    acc = _Acc(vs, tokenizer or approx_tokens)
    report = Report()
    for e in iter_dataset(paths, vs, strict, fmt, max_line_bytes, report):
        if e.ok and e.record is not None:
            acc.add(e.record)
    out = acc.result(report, "tokenizer" if tokenizer else "approx")
    out["voice_set"] = vs.name
    return out


def print_stats(stats: dict[str, Any], console: Console | None = None) -> None:
    """Print the statistics as rich tables (all model text goes in as plain Text, not markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = console or Console()
    tok = stats["tokens"]
    approx = " (approx.)" if tok["method"] == "approx" else ""
    summary = Table(title="Dataset", show_header=False)
    summary.add_row("examples", str(stats["examples"]))
    skipped = stats["skipped"]
    reasons = ", ".join(f"{k}: {n}" for k, n in stats["skipped_reasons"].items())
    summary.add_row("skipped lines", f"{skipped}" + (f" ({reasons})" if reasons else ""))
    summary.add_row(
        "messages",
        f"{stats['messages']} ({', '.join(f'{k} {n}' for k, n in stats['roles'].items())})",
    )
    summary.add_row(f"tokens{approx}", f"{tok['total']} (replies {tok['assistant']})")
    rl = stats["reply_tokens"]
    summary.add_row("reply tokens", f"min {rl['min']}, mean {rl['mean']:.1f}, max {rl['max']}")
    con.print(summary)

    def name(v: str) -> Text:
        return Text(v, style=next((x["color"] for x in stats["voices"] if x["voice"] == v), ""))

    vt = Table(title="Voices")
    for col in ("voice", "segments", "examples", f"tokens{approx}", "share", ""):
        vt.add_column(col, justify="left" if col in ("voice", "") else "right")
    for v in stats["voices"]:
        label = name(v["voice"])
        if not v["declared"]:
            label.append(" (undeclared)", style="dim")
        bar = Text("█" * round(v["share"] * 30), style=v["color"])
        vt.add_row(
            label,
            str(v["segments"]),
            str(v["examples"]),
            str(v["tokens"]),
            f"{v['share']:.1%}",
            bar,
        )
    con.print(vt)

    ot = Table(title=f"Voice orders (top {TOP_ORDERS} of {stats['distinct_orders']})")
    ot.add_column("count", justify="right")
    ot.add_column("order")
    for o in stats["orders"]:
        seq = Text()
        for k, v in enumerate(o["order"]):
            if k:
                seq.append(" → ", style="dim")
            seq.append_text(name(v))
        ot.add_row(str(o["count"]), seq if o["order"] else Text("(no text)", style="dim"))
    con.print(ot)

    tr = stats["transitions"]
    if tr["voices"]:
        tt = Table(title="Transitions (row → column)")
        tt.add_column("from \\ to")
        for v in tr["voices"]:
            tt.add_column(name(v), justify="right")
        for v, row in zip(tr["voices"], tr["matrix"], strict=True):
            tt.add_row(name(v), *[str(n) if n else "·" for n in row])
        con.print(tt)

    ht = Table(title=f"Reply length (tokens{approx})")
    ht.add_column("tokens", justify="right")
    ht.add_column("replies", justify="right")
    ht.add_column("")
    top = max((b["count"] for b in rl["bins"]), default=0) or 1
    for b in rl["bins"]:
        hi = "" if b["hi"] is None else str(b["hi"])
        ht.add_row(f"{b['lo']}–{hi}", str(b["count"]), "█" * round(b["count"] / top * 30))
    con.print(ht)
