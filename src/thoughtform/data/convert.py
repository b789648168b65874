"""Convert dataset files to clean ``messages`` JSONL: valid examples only, voices as markers."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from ..voices import VoiceSet
from . import formats as F
from .lines import DEFAULT_MAX_LINE_BYTES, DatasetError
from .validate import Issue, Report, check_inputs, iter_dataset


def dumps_example(obj: object) -> str:
    """One JSONL line (no newline): UTF-8 text kept as is, compact separators."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _write(
    out: TextIO,
    paths: list[Path],
    voices: VoiceSet | str | None,
    strict: bool,
    fmt: F.Format | None,
    max_line_bytes: int,
    on_issue: Callable[[Issue], None] | None,
) -> Report:
    report = Report()
    for e in iter_dataset(paths, voices, strict, fmt, max_line_bytes, report):
        if on_issue is not None:
            for i in e.issues:
                on_issue(i)
        if e.ok and e.record is not None:
            out.write(dumps_example(e.record.to_json_obj()))
            out.write("\n")
    return report


def convert(
    paths: Iterable[str | Path] | str | Path,
    out: str | Path | TextIO,
    voices: VoiceSet | str | None = "seed",
    strict: bool = False,
    fmt: F.Format | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    on_issue: Callable[[Issue], None] | None = None,
) -> Report:
    """Write the valid examples of ``paths`` to ``out`` as ``messages`` JSONL (LF, UTF-8).

    A path ``out`` is written atomically (temporary file, then rename) and must not be an input.
    Returns the totals; ``report.skipped`` counts skipped lines per reason.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    inputs = check_inputs(paths)
    if not isinstance(out, (str, Path)):
        return _write(out, inputs, voices, strict, fmt, max_line_bytes, on_issue)
    if str(out) == "-":
        return _write(sys.stdout, inputs, voices, strict, fmt, max_line_bytes, on_issue)
    dest = Path(out)
    for p in inputs:
        if dest.exists() and p.exists() and os.path.samefile(p, dest):
            raise DatasetError(f"{dest}: output is also an input; choose another output path")
    if dest.is_dir():
        raise DatasetError(f"{dest}: is a directory, expected an output file path")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise DatasetError(f"{dest}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            report = _write(f, inputs, voices, strict, fmt, max_line_bytes, on_issue)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


def skipped_summary(report: Report) -> str:
    """``converted N examples, skipped M lines (reason: count, ...)``."""
    head = f"converted {report.examples} example{'s' if report.examples != 1 else ''}"
    total = sum(report.skipped.values())
    if not total:
        return f"{head}, skipped 0 lines"
    reasons = ", ".join(f"{code}: {n}" for code, n in report.skipped.most_common())
    return f"{head}, skipped {total} line{'s' if total != 1 else ''} ({reasons})"
