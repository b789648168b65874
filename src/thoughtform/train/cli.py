"""``thoughtform train DATA --out DIR ...``: argparse front end of the LoRA trainer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cliparse import OneLineParser
from .lora import DEFAULT_TARGETS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """The ``thoughtform train`` argument parser."""
    p = OneLineParser(
        prog="thoughtform train",
        description="LoRA-tune a model on voiced chat data (loss on assistant replies only); "
        "writes DIR/adapter (peft), DIR/adapter.gguf (llama.cpp) and DIR/training.json.",
    )
    p.add_argument("data", nargs="+", help="dataset JSONL file(s) in the messages format")
    p.add_argument("--out", required=True, help="output directory (checkpoints, adapter, report)")
    p.add_argument("--base", default="embedded", help="'embedded' (default) or a GGUF/model path")
    p.add_argument("--voices", default="seed", help="voice set the data is validated against")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated modules to adapt (default: all attention and MLP projections)",
    )
    p.add_argument("--max-len", type=int, default=256, help="tokens per example (default 256)")
    p.add_argument("--batch", type=int, default=4, help="examples per step (default 4)")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps (default 10)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init and data order")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--export-dtype", choices=("f16", "f32"), default="f16", help="GGUF LoRA type")
    p.add_argument("--no-export", action="store_true", help="skip writing DIR/adapter.gguf")
    p.add_argument(
        "--export-merged",
        action="store_true",
        help="also write DIR/merged-f16.gguf: base + adapter in one model (GGUF base only)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def cli_train(argv: list[str]) -> int:
    """Run ``thoughtform train`` with ``argv``; 0 on success, 2 on a user mistake, 1 on failure."""
    args = build_parser().parse_args(argv)
    from .encode import EncodeError
    from .export import ExportError
    from .lora import Trainer, TrainError

    for d in args.data:
        if not Path(d).is_file():
            print(f"thoughtform train: error: {d}: no such file", file=sys.stderr)
            return 2
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if not targets:
        print("thoughtform train: error: --targets is empty", file=sys.stderr)
        return 2
    alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
    cfg = TrainConfig(
        data=[str(d) for d in args.data],
        out=args.out,
        base=args.base,
        voices=args.voices,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        lora_r=args.lora_r,
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        max_len=args.max_len,
        batch=args.batch,
        warmup=args.warmup,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        export_dtype=args.export_dtype,
        export=not args.no_export,
        export_merged=args.export_merged,
    )
    try:
        trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet)
        result = trainer.run()
    except (TrainError, EncodeError, ExportError, ValueError) as e:
        print(
            f"thoughtform train: error: {str(e).splitlines()[0] if str(e) else e!r}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("thoughtform train: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    last = result.losses[-1] if result.losses else float("nan")
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s, last loss {last:.4f}; "
        f"adapter in {result.adapter_dir}" + (f", GGUF {result.gguf}" if result.gguf else "")
    )
    return 0
