"""``thoughtform eval adherence``: plain model + voice prompt vs. the voices adapter, via llama.cpp."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cliparse import OneLineParser
from .adherence import MAX_NEW_TOKENS

PROG = "thoughtform eval"


def build_parser() -> argparse.ArgumentParser:
    """The ``thoughtform eval`` argument parser (one subcommand: ``adherence``)."""
    p = OneLineParser(prog=PROG, description="Evaluate voiced generation.")
    sub = p.add_subparsers(dest="what", required=True, parser_class=OneLineParser)
    a = sub.add_parser(
        "adherence",
        help="form, character and originality of replies: plain model vs. voices adapter",
        description="One reply per prompt from the plain model (with the voice system prompt) and "
        "from the model with the voices adapter, generated through llama.cpp; prints form rates, "
        "voice accuracy, copied-sentence rate, distinct-2, relevance (replies sharing a content "
        "word with their prompt, and the same for mismatched pairs) and tic rate (the largest "
        "share of replies using one content word that is in no prompt).",
    )
    a.add_argument("--prompts", default=None, help="prompt file, one a line (default: shipped set)")
    a.add_argument("--model", default="embedded", help="base GGUF (default: embedded SmolLM2)")
    a.add_argument("--adapter", default=None, help="GGUF LoRA (default: shipped voices adapter)")
    a.add_argument(
        "--dataset",
        default=None,
        help="training JSONL for the voice classifier and copy check "
        "(default: the synthetic set the shipped adapter was trained on)",
    )
    a.add_argument("--voices", default="seed", help="voice set (default seed)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed+i)")
    a.add_argument("--max-tokens", type=int, default=MAX_NEW_TOKENS, help="new tokens per reply")
    a.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    a.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    a.add_argument("--save", default=None, help="write prompts and both replies to this JSONL")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    from .council import add_council_parser

    add_council_parser(sub)
    from .vectors import add_vectors_parser

    add_vectors_parser(sub)
    return p


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _training(dataset: str | None, voices: str) -> list[list[dict[str, str]]]:
    if dataset is None:
        from ..adapters import SHIPPED_SYNTH
        from ..data.synth import synth

        return [ex["messages"] for ex in synth(voices, **SHIPPED_SYNTH)]
    from ..train.lora import load_examples

    examples, _ = load_examples([dataset], voices)
    return examples


def cli_eval(argv: list[str]) -> int:
    """Run ``thoughtform eval ...`` with ``argv``; 0 on success, 2 on a user mistake."""
    args = build_parser().parse_args(argv)
    if args.what == "council":
        from .council import cli_council_eval

        return cli_council_eval(args)
    if args.what == "vectors":
        from .vectors import cli_vectors_eval

        return cli_vectors_eval(args)
    from ..voices import VoiceSetError, resolve_voice_set
    from . import adherence as A

    try:
        vs = resolve_voice_set(args.voices)
    except VoiceSetError as e:
        return _fail(str(e))
    prompts_path = Path(args.prompts) if args.prompts else A.default_prompts_path()
    if not prompts_path.is_file():
        return _fail(f"{prompts_path}: no such file")
    try:
        prompts = A.read_prompts(prompts_path)
    except UnicodeDecodeError:
        return _fail(f"{prompts_path}: not valid UTF-8")
    if args.limit is not None:
        if args.limit < 1:
            return _fail(f"--limit must be >= 1, got {args.limit}")
        prompts = prompts[: args.limit]
    if not prompts:
        return _fail(f"{prompts_path}: no prompts")
    if args.max_tokens < 1:
        return _fail(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.dataset is not None and not Path(args.dataset).is_file():
        return _fail(f"{args.dataset}: no such file")
    from ..adapters import voices_adapter_path
    from ..backends.base import BackendError
    from ..prompting import voice_system_prompt
    from ..train.lora import TrainError

    adapter = Path(args.adapter) if args.adapter else voices_adapter_path()
    if not adapter.is_file():
        return _fail(f"{adapter}: no such adapter file")
    try:
        training = _training(args.dataset, args.voices)
        common: dict[str, Any] = {
            "model": args.model,
            "voices": vs,
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        }
        base = A.generate_replies(prompts, system=voice_system_prompt(vs), **common)
        tuned = A.generate_replies(prompts, lora_path=adapter, **common)
        result = A.score(prompts, base, tuned, training, vs)
    except (BackendError, TrainError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else repr(e))
    if args.save:
        with open(args.save, "w", encoding="utf-8") as f:
            for p, b, t in zip(prompts, base, tuned, strict=True):
                f.write(json.dumps({"prompt": p, "base": b, "tuned": t}, ensure_ascii=False) + "\n")
    s = result.summary()
    if args.json:
        print(json.dumps(s))
        return 0
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"prompts                {s['n']}")
    print(f"well-formed, base      {pct(s['base'])}  (plain model + voice system prompt)")
    print(f"well-formed, tuned     {pct(s['tuned'])}  (voices adapter)")
    print(f"voice accuracy         {pct(s['voice_accuracy'])}  (classifier agrees with the marker)")
    print(f"copied sentences       {pct(s['copied_sentence_rate'])}  (verbatim from training data)")
    print(f"distinct-2             {s['distinct2']:.3f}")
    for who, pre in (("tuned", ""), ("base", "base_")):
        print(
            f"relevance, {who:<5}       {pct(s[pre + 'relevance'])}  (shares a content word with its "
            f"prompt; mismatched pairs {pct(s[pre + 'relevance_shuffled'])})"
        )
    for who, pre in (("tuned", ""), ("base", "base_")):
        word = s[pre + "tic_word"]
        print(
            f"tic rate, {who:<5}        {pct(s[pre + 'tic_rate'])}"
            + (f"  (replies with {word!r}, a word in no prompt)" if word else "")
        )
    return 0
