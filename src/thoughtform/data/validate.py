"""Validate dataset files line by line: every bad line is reported with its number and reason,
and reading carries on (constant memory, whatever the file size)."""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..voices import VoiceSet, resolve_voice_set
from . import formats as F
from .lines import DEFAULT_MAX_LINE_BYTES, DatasetError, Line, iter_lines, open_binary

# Real chat records nest 5 deep; past this a line is garbage or an attack on the decoder, and the
# limit must not depend on Python's recursion limit.
MAX_JSON_DEPTH = 64
_JSON_SPECIAL = re.compile(r'["\[\]{}]')

# A transcript is one reply held whole in memory; past this it is surely not one reply.
MAX_TRANSCRIPT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Issue:
    """A problem at ``path:line``."""

    path: str
    line: int
    code: str
    reason: str
    severity: F.Severity = "error"

    def format(self) -> str:
        """``PATH:LINE: reason`` (``PATH:LINE: warning: reason`` for warnings)."""
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.path}:{self.line}: {tag}{self.reason}"


@dataclass
class Entry:
    """One example (or one unusable line): where it starts, the record, and its issues."""

    path: str
    line: int
    record: F.Record | None
    issues: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether this entry is a usable example (warnings allowed)."""
        return self.record is not None and not any(i.severity == "error" for i in self.issues)

    @property
    def first_error(self) -> str | None:
        """The code of the first error, which is what ``convert`` counts a skipped line under."""
        for i in self.issues:
            if i.severity == "error":
                return i.code
        if self.record is None:
            return self.issues[0].code if self.issues else None
        return None


@dataclass
class Report:
    """Totals over the files: entries checked, usable examples, skipped lines by reason, issue counts."""

    checked: int = 0
    examples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    issues: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    warnings: int = 0

    def add(self, e: Entry) -> None:
        """Count one entry."""
        self.checked += 1
        if e.ok:
            self.examples += 1
        else:
            self.skipped[e.first_error or "unknown"] += 1
        for i in e.issues:
            self.issues[i.code] += 1
            if i.severity == "error":
                self.errors += 1
            else:
                self.warnings += 1

    @property
    def bad_lines(self) -> int:
        """Entries skipped because of an error (blank lines are skipped but not bad)."""
        return sum(n for code, n in self.skipped.items() if code != F.BLANK_WARN)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping."""
        return {
            "checked": self.checked,
            "examples": self.examples,
            "bad_lines": self.bad_lines,
            "skipped": dict(self.skipped),
            "issues": dict(self.issues),
            "errors": self.errors,
            "warnings": self.warnings,
        }


def json_depth(text: str) -> int:
    """How deeply brackets nest in JSON ``text`` (brackets inside strings do not count)."""
    # A hand scan, linear even on hostile input (a regex for strings rescans unclosed ones).
    depth = best = 0
    i = 0
    while (m := _JSON_SPECIAL.search(text, i)) is not None:
        c, j = m.group(0), m.start()
        if c == '"':
            k = j + 1
            while True:
                k = text.find('"', k)
                if k < 0:
                    return best  # unterminated string: json.loads will say so
                b = k - 1
                while b > j and text[b] == "\\":
                    b -= 1
                if (k - 1 - b) % 2 == 0:  # an even run of backslashes: the quote is real
                    break
                k += 1
            i = k + 1
            continue
        if c in "[{":
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
        i = j + 1
    return best


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _line_warnings(path: str, ln: Line, crlf_seen: bool) -> list[Issue]:
    out: list[Issue] = []
    if ln.bom:
        where = "file" if ln.number == 1 else "line (concatenated files?)"
        out.append(
            Issue(
                path,
                ln.number,
                F.BOM_WARN,
                f"UTF-8 byte-order mark at start of {where}; convert drops it",
                "warning",
            )
        )
    if ln.crlf and not crlf_seen:
        out.append(
            Issue(
                path,
                ln.number,
                F.CRLF_WARN,
                "CRLF line ending (reported once per file); convert writes LF",
                "warning",
            )
        )
    return out


def _line_error(path: str, ln: Line, max_line_bytes: int) -> Issue | None:
    if ln.too_long:
        return Issue(
            path,
            ln.number,
            F.TOO_LONG,
            f"line too long ({ln.too_long} bytes; the limit is {max_line_bytes})",
        )
    if ln.bad_utf8:
        return Issue(path, ln.number, F.BAD_UTF8, f"invalid UTF-8 at byte {ln.bad_utf8}")
    return None


def _jsonl_entries(
    path: str, lines: Iterable[Line], voices: VoiceSet, strict: bool, max_line_bytes: int
) -> Iterator[Entry]:
    crlf_seen = False
    for ln in lines:
        issues = _line_warnings(path, ln, crlf_seen)
        crlf_seen = crlf_seen or ln.crlf
        err = _line_error(path, ln, max_line_bytes)
        if err is not None:
            yield Entry(path, ln.number, None, [*issues, err])
            continue
        text = ln.text or ""
        if not text.strip():
            issues.append(Issue(path, ln.number, F.BLANK_WARN, "blank line (skipped)", "warning"))
            yield Entry(path, ln.number, None, issues)
            continue
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
            depth = json_depth(text)
            if depth > MAX_JSON_DEPTH:
                issues.append(
                    Issue(
                        path,
                        ln.number,
                        F.TOO_DEEP,
                        f"JSON nested too deeply (depth {depth}; the limit is {MAX_JSON_DEPTH})",
                    )
                )
                yield Entry(path, ln.number, None, issues)
                continue
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            hint = ""
            if ln.number == 1 and text.lstrip().startswith("["):
                hint = " (the file looks like one JSON array; JSONL needs one object per line)"
            elif ln.number == 1 and text.strip() == "{":
                hint = " (the file looks like pretty-printed JSON; JSONL needs one object per line)"
            issues.append(
                Issue(
                    path, ln.number, F.BAD_JSON, f"invalid JSON: {e.msg} at column {e.colno}{hint}"
                )
            )
            yield Entry(path, ln.number, None, issues)
            continue
        except RecursionError:
            issues.append(Issue(path, ln.number, F.TOO_DEEP, "invalid JSON: nested too deeply"))
            yield Entry(path, ln.number, None, issues)
            continue
        except ValueError as e:
            issues.append(Issue(path, ln.number, F.BAD_JSON, f"invalid JSON: {e}"))
            yield Entry(path, ln.number, None, issues)
            continue
        rec = F.normalize_record(obj, voices, strict)
        del obj
        issues.extend(Issue(path, ln.number, p.code, p.reason, p.severity) for p in rec.problems)
        yield Entry(path, ln.number, rec, issues)


def _transcript_entries(
    path: str, lines: Iterable[Line], voices: VoiceSet, strict: bool, max_line_bytes: int
) -> Iterator[Entry]:
    issues: list[Issue] = []
    parts: list[str] = []
    starts: list[int] = []  # offset in the text where each kept line begins
    numbers: list[int] = []  # and its line number (bad lines are left out of the text)
    pos = 0
    crlf_seen = False
    usable = True
    for ln in lines:
        issues.extend(_line_warnings(path, ln, crlf_seen))
        crlf_seen = crlf_seen or ln.crlf
        err = _line_error(path, ln, max_line_bytes)
        if err is not None:
            issues.append(err)
            usable = False
            continue
        text = ln.text or ""
        if pos + len(text) > MAX_TRANSCRIPT_BYTES:
            issues.append(
                Issue(
                    path,
                    ln.number,
                    F.TOO_LONG,
                    f"transcript too long (over {MAX_TRANSCRIPT_BYTES} characters)",
                )
            )
            yield Entry(path, 1, None, issues)
            return
        starts.append(pos)
        numbers.append(ln.number)
        parts.append(text)
        pos += len(text)
    text = "".join(parts)
    # Whitespace around the whole file (the final newline, leading blank lines) is not the reply.
    lead = len(text) - len(text.lstrip())
    # The rest is still checked when a line was unusable, so one run reports every problem.
    rec = F.transcript_record(text.strip(), voices, strict)

    def line_of(offset: int | None) -> int:
        if offset is None or not starts:
            return 1
        return numbers[max(0, bisect_right(starts, offset + lead) - 1)]

    issues.extend(
        Issue(path, line_of(p.offset), p.code, p.reason, p.severity) for p in rec.problems
    )
    issues.sort(key=lambda i: i.line)
    yield Entry(path, 1, rec if usable else None, issues)


def iter_entries(
    path: str | Path,
    voices: VoiceSet | str | None = "seed",
    strict: bool = False,
    fmt: F.Format | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Entry]:
    """Entries of one file in order: each JSONL line, or the one transcript example."""
    vs = resolve_voice_set(voices)
    kind = fmt or F.detect_format(path)
    name = str(path)
    with open_binary(path) as f:
        transcript = kind == "transcript"
        lines = iter_lines(f, max_line_bytes, keep_ends=transcript)
        gen = _transcript_entries if transcript else _jsonl_entries
        yield from gen(name, lines, vs, strict, max_line_bytes)


def check_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """The paths as Path objects; raise DatasetError for the first that is not a readable file."""
    out: list[Path] = []
    for p in paths:
        open_binary(p).close()
        out.append(Path(p))
    if not out:
        raise DatasetError("no input files given")
    return out


def iter_dataset(
    paths: Iterable[str | Path],
    voices: VoiceSet | str | None = "seed",
    strict: bool = False,
    fmt: F.Format | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    report: Report | None = None,
) -> Iterator[Entry]:
    """Entries of several files in order, counted into ``report`` when given."""
    vs = resolve_voice_set(voices)
    for p in check_inputs(paths):
        for e in iter_entries(p, vs, strict, fmt, max_line_bytes):
            if report is not None:
                report.add(e)
            yield e


def validate(
    paths: Iterable[str | Path] | str | Path,
    voices: VoiceSet | str | None = "seed",
    strict: bool = False,
    fmt: F.Format | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    on_issue: Callable[[Issue], None] | None = None,
) -> Report:
    """Validate files, calling ``on_issue`` for each problem as it is found; return the totals."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    report = Report()
    for e in iter_dataset(paths, voices, strict, fmt, max_line_bytes, report):
        if on_issue is not None:
            for i in e.issues:
                on_issue(i)
    return report
