"""``thoughtform dataset validate|stats|convert|show|synth``: argparse front end to the data package.

Exit codes: 0 fine (warnings allowed), 1 bad lines found, 2 user mistake (missing file, bad option).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..voices import VoiceSetError, resolve_voice_set
from .lines import DEFAULT_MAX_LINE_BYTES, DatasetError

OK, BAD, USAGE = 0, 1, 2


def _common(p: argparse.ArgumentParser, many: bool = True) -> None:
    if many:
        p.add_argument(
            "paths", nargs="+", metavar="FILE", help="JSONL (.jsonl) or transcript (.txt)"
        )
    else:
        p.add_argument("paths", nargs=1, metavar="FILE", help="JSONL (.jsonl) or transcript (.txt)")
    p.add_argument(
        "--voices", default="seed", help="voice preset or voice-set YAML (default: seed)"
    )
    p.add_argument(
        "--strict", action="store_true", help="reject markers of voices not in the voice set"
    )
    p.add_argument(
        "--format",
        choices=("auto", "jsonl", "transcript"),
        default="auto",
        help="auto: .txt/.md are transcripts, anything else JSONL",
    )
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help=f"longer lines are reported and skipped (default {DEFAULT_MAX_LINE_BYTES})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``dataset`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="thoughtform dataset",
        description="Check, measure, convert, show and synthesise voiced chat datasets.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="report every bad line as PATH:LINE: reason")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the totals as JSON at the end")

    p = sub.add_parser("stats", help="examples, tokens, voice shares, orders, transitions")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="count tokens with a local Hugging Face tokenizer"
    )

    p = sub.add_parser("convert", help="write valid examples as messages JSONL, voices as markers")
    _common(p)
    p.add_argument("--out", "-o", required=True, metavar="OUT", help="output JSONL ('-' = stdout)")

    p = sub.add_parser("show", help="show examples with replies coloured by voice")
    _common(p, many=False)
    p.add_argument("--line", type=int, default=1, metavar="N", help="first line to show")
    p.add_argument("-n", "--n", type=int, default=3, dest="count", help="how many (default 3)")

    p = sub.add_parser("synth", help="write a synthetic voiced dataset (and a held-out split)")
    p.add_argument(
        "--voices", default="seed", help="voice preset or voice-set YAML (default: seed)"
    )
    p.add_argument("--n", type=int, default=2000, help="examples in all (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="output JSONL")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction written to FILE.heldout.jsonl, on held-out topics (e.g. 0.1)",
    )
    p.add_argument("--system", action="store_true", help="add a system message naming the voices")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


def _fmt(args: argparse.Namespace) -> Any:
    return None if args.format == "auto" else args.format


def _print_issue(issue: Any) -> None:
    from .show import safe

    print(safe(issue.format()), flush=False)


def _validate(args: argparse.Namespace) -> int:
    from .validate import validate

    r = validate(
        args.paths, args.voices, args.strict, _fmt(args), args.max_line_bytes, _print_issue
    )
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(
            f"checked {r.checked} entr{'y' if r.checked == 1 else 'ies'}: {r.examples} valid, "
            f"{r.bad_lines} bad, {r.warnings} warning{'s' if r.warnings != 1 else ''}"
        )
    return BAD if r.bad_lines else OK


def _stats(args: argparse.Namespace) -> int:
    from .stats import dataset_stats, hf_token_counter, print_stats

    counter = None
    if args.tokenizer:
        try:
            counter = hf_token_counter(args.tokenizer)
        except Exception as e:  # any loader failure is the user's path or install
            raise DatasetError(f"{args.tokenizer}: cannot load tokenizer: {e}") from None
    s = dataset_stats(
        args.paths, args.voices, counter, args.strict, _fmt(args), args.max_line_bytes
    )
    if args.json:
        print(json.dumps(s, ensure_ascii=False))
    else:
        print_stats(s)
    return OK


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert, skipped_summary

    def to_stderr(issue: Any) -> None:
        from .show import safe

        print(safe(issue.format()), file=sys.stderr)

    r = convert(
        args.paths, args.out, args.voices, args.strict, _fmt(args), args.max_line_bytes, to_stderr
    )
    print(skipped_summary(r), file=sys.stderr if args.out == "-" else sys.stdout)
    return BAD if r.bad_lines else OK


def _show(args: argparse.Namespace) -> int:
    from .show import show

    show(
        args.paths,
        args.voices,
        args.line,
        args.count,
        args.strict,
        _fmt(args),
        args.max_line_bytes,
    )
    return OK


def _synth(args: argparse.Namespace) -> int:
    from .synth import write_synth

    if args.n < 0:
        raise DatasetError(f"--n must be >= 0, got {args.n}")
    if not 0 <= args.holdout < 1:
        raise DatasetError(f"--holdout must be in [0, 1), got {args.holdout}")
    try:
        res = write_synth(args.out, args.voices, args.n, args.seed, args.holdout, args.system)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    except OSError as e:
        raise DatasetError(f"{args.out}: cannot write: {e.strerror}") from None
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
        return OK
    d = res["diversity"]
    msg = f"wrote {res['train']} examples to {res['out']}"
    if "heldout" in res:
        msg += f" and {res['heldout']} held-out examples to {res['heldout_out']}"
    print(msg)
    print(
        f"distinct sentences: {d['ratio']:.1%} ({d['distinct']} of {d['sentences']})"
        + (
            f"; most repeated x{d['most_repeated'][0]['count']}: {d['most_repeated'][0]['sentence']}"
            if d["most_repeated"]
            else ""
        )
    )
    return OK


COMMANDS = {
    "validate": _validate,
    "stats": _stats,
    "convert": _convert,
    "show": _show,
    "synth": _synth,
}


def cli_dataset(argv: list[str]) -> int:
    """Run ``thoughtform dataset ARGV...``; return the exit code (0 ok, 1 bad lines, 2 misuse)."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return int(e.code) if isinstance(e.code, int) else USAGE
    if getattr(args, "max_line_bytes", 1) < 1:
        print("thoughtform dataset: --max-line-bytes must be >= 1", file=sys.stderr)
        return USAGE
    try:
        resolve_voice_set(args.voices)
        return COMMANDS[args.command](args)
    except (DatasetError, VoiceSetError) as e:
        print(str(e), file=sys.stderr)
        return USAGE
    except BrokenPipeError:
        # `... | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return OK


def main() -> None:
    """Entry point for ``python -m thoughtform.data.cli``."""
    sys.exit(cli_dataset(sys.argv[1:]))


if __name__ == "__main__":
    main()
