"""``thoughtform vectors train|path|list|show|strengths``: voice vectors from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cliparse import OneLineParser

PROG = "thoughtform vectors"


def build_parser() -> argparse.ArgumentParser:
    """The ``thoughtform vectors`` argument parser."""
    from .train import DEFAULT_HOLDOUT, DEFAULT_MAX_EXAMPLES, DEFAULT_METHOD, METHODS

    ap = OneLineParser(prog=PROG, description="Voice vectors: train, inspect and find them.")
    sub = ap.add_subparsers(dest="action", required=True, parser_class=OneLineParser)

    p = sub.add_parser(
        "train",
        help="train one direction per voice and write DIR/<Voice>.gguf + DIR/vectors.json",
        description="Train one steering direction per voice per layer from a voices dataset "
        "(transformers, CPU) and export llama.cpp control vectors.",
    )
    p.add_argument("data", nargs="+", help="voices dataset JSONL (e.g. from `dataset synth`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--voices", default="seed", help="voice set: preset or YAML (default seed)")
    p.add_argument("--base", default="embedded", help="'embedded' (default) or a GGUF/model path")
    p.add_argument(
        "--layers",
        help="steered layers A-B, inclusive (default: a third to three quarters of the stack, "
        "10-22 of 30)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="mean of the paired voice-vs-others differences, or their first principal axis "
        f"(default {DEFAULT_METHOD}: it separated held-out replies better here)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the example choice and split (default 0)"
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=DEFAULT_MAX_EXAMPLES,
        help=f"replies read, 0 = all (default {DEFAULT_MAX_EXAMPLES})",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help=f"share kept out to measure separation (default {DEFAULT_HOLDOUT})",
    )
    p.add_argument("--max-len", type=int, default=256, help="tokens per reply (default 256)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's own choice)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: off)")

    p = sub.add_parser("path", help="print the directory of a shipped vector set")
    p.add_argument("name", nargs="?", default="seed", help="shipped set (default: seed)")

    sub.add_parser("list", help="list the vector sets installed with thoughtform")

    p = sub.add_parser("show", help="voices, layers and held-out accuracy of a vector set")
    p.add_argument("set", help="shipped set name or directory")

    p = sub.add_parser(
        "strengths",
        help="set the default strengths a vector set ships with (vectors.json)",
        description="Write default strengths into DIR/vectors.json: VOICE=S pairs, or the "
        "defaults `thoughtform eval vectors --json` picked (--from-eval FILE).",
    )
    p.add_argument("set", help="vector directory (or shipped set name)")
    p.add_argument("pairs", nargs="*", help="VOICE=STRENGTH, strength in -4..4")
    p.add_argument("--from-eval", help="an `eval vectors --json` output: its default_strength")
    return ap


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from .cvec import VectorFileError
    from .export import write_vector_dir
    from .train import VectorTrainConfig, VectorTrainError, parse_layers, run_training

    for d in args.data:
        if not Path(d).is_file():
            return _fail(f"{d}: no such file")
    try:
        layers = parse_layers(args.layers) if args.layers else None
        cfg = VectorTrainConfig(
            data=[str(d) for d in args.data],
            out=args.out,
            voices=args.voices,
            base=args.base,
            layers=layers,
            method=args.method,
            seed=args.seed,
            max_examples=args.max_examples,
            holdout=args.holdout,
            max_len=args.max_len,
            threads=args.threads,
        )
        outcome = run_training(cfg, progress=not args.quiet)
        out = write_vector_dir(outcome, cfg)
    except (VectorTrainError, VectorFileError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else repr(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    lo, hi = outcome.layers
    print(
        f"{len(outcome.results)} voice vectors ({cfg.method}, layers {lo}-{hi}) in {out}, "
        f"{outcome.seconds:.0f}s"
    )
    for name, r in outcome.results.items():
        vals = [a for a in r.accuracy.values() if a == a]
        acc = f"{sum(vals) / len(vals):.3f}" if vals else "n/a"
        print(f"  {name:12} held-out pair accuracy {acc} ({r.heldout_pairs} pairs)")
    return 0


def _show(spec: str) -> int:
    from .sets import load_vector_set

    vset = load_vector_set(spec)
    m = vset.meta
    layers = m.get("layers") or [min(min(cv.layers) for cv in vset.vectors.values()), None]
    print(f"{vset.path}")
    print(
        f"method {m.get('method', '?')}, layers {layers[0]}-{layers[-1]}, base {m.get('base', '?')}"
    )
    for voice, cv in vset.vectors.items():
        info = m.get("voices", {}).get(voice, {})
        acc = info.get("heldout_accuracy")
        print(
            f"  {voice:12} {len(cv):2} layers  n_embd {cv.n_embd}  "
            f"strength {vset.default_strength(voice):g}"
            + (f"  held-out accuracy {acc:.3f}" if isinstance(acc, float) else "")
        )
    return 0


def _strengths(args: argparse.Namespace) -> int:
    from .sets import set_default_strengths, strengths_from_eval

    want: dict[str, float] = strengths_from_eval(args.from_eval) if args.from_eval else {}
    for pair in args.pairs:
        voice, eq, val = pair.partition("=")
        try:
            want[voice.strip()] = float(val)
        except ValueError:
            return _fail(f"{pair}: VOICE=STRENGTH is required")
        if not eq or not voice.strip():
            return _fail(f"{pair}: VOICE=STRENGTH is required")
    if not want:
        return _fail("strengths: give VOICE=S pairs or --from-eval FILE")
    got = set_default_strengths(args.set, want)
    print("  ".join(f"{k} {v:g}" for k, v in got.items()))
    return 0


def cli_vectors(argv: list[str]) -> int:
    """Run ``thoughtform vectors`` with ``argv``; 0 on success, 2 on a user mistake."""
    args = build_parser().parse_args(argv)
    from .cvec import VectorFileError
    from .sets import shipped_dir, shipped_sets

    if args.action == "train":
        return _train(args)
    try:
        if args.action == "path":
            if args.name not in shipped_sets():
                known = ", ".join(shipped_sets()) or "none"
                return _fail(f"{args.name}: not a shipped vector set (shipped: {known})")
            print(shipped_dir(args.name))
            return 0
        if args.action == "list":
            from .sets import load_vector_set

            for name in shipped_sets():
                vset = load_vector_set(name)
                lo, hi = (vset.meta.get("layers") or ["?", "?"])[:2]
                print(
                    f"{name:10} {', '.join(vset.vectors)}  "
                    f"({vset.meta.get('method', '?')}, layers {lo}-{hi})  {vset.path}"
                )
            return 0
        if args.action == "strengths":
            return _strengths(args)
        return _show(args.set)
    except VectorFileError as e:
        return _fail(str(e))
