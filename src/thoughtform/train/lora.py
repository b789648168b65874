"""LoRA fine-tuning with peft: deterministic batches, checkpoints, exact resume, training.json."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .encode import IGNORE, Encoded, encode_chat

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
ADAPTER_GGUF = "adapter.gguf"
MERGED_GGUF = "merged-f16.gguf"
TRAINING_JSON = "training.json"
_DONE = "done.json"  # written last into a checkpoint: a directory without it is incomplete
EVAL_EXAMPLES = 32  # examples in the before/after loss sample
_SORT_WINDOW = 32  # batches per window whose examples are sorted by length (less padding)


class TrainError(RuntimeError):
    """Training cannot start or continue (bad data, bad settings, nothing to resume)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (and so must match when resuming)."""

    data: list[str]
    out: str
    base: str = "embedded"
    voices: str = "seed"
    epochs: float = 1.0
    steps: int | None = None
    lr: float = 3e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_len: int = 256
    batch: int = 4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    export_dtype: str = "f16"
    export: bool = True
    export_merged: bool = False

    def identity(self) -> dict[str, Any]:
        """The settings a checkpoint is only valid for (resume refuses any difference)."""
        skip = {
            "out",
            "device",
            "threads",
            "save_every",
            "keep_checkpoints",
            "export",
            "export_dtype",
            "export_merged",
        }
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class TrainResult:
    """Where a finished run wrote its adapter and how it went."""

    out: Path
    adapter_dir: Path
    gguf: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None
    loss_before: float | None = None
    loss_after: float | None = None


def resolve_device(spec: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed through."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {spec!r} asked for, but CUDA is not available")
    return spec


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_examples(
    paths: Sequence[str | Path], voices: str = "seed"
) -> tuple[list[list[dict[str, str]]], int]:
    """The usable conversations (``messages`` lists) of dataset files, and how many were skipped."""
    from ..data.lines import DatasetError
    from ..data.validate import iter_dataset

    out: list[list[dict[str, str]]] = []
    skipped = 0
    try:
        for e in iter_dataset(paths, voices):
            if e.ok and e.record is not None:
                out.append(e.record.messages)
            elif e.record is not None or any(i.severity == "error" for i in e.issues):
                skipped += 1
    except DatasetError as e:
        raise TrainError(str(e)) from None
    if not out:
        raise TrainError(f"no usable examples in {', '.join(str(p) for p in paths)}")
    return out, skipped


def data_digest(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the dataset files' bytes (resume checks the data did not change)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def epoch_batches(lengths: Sequence[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of example indices: shuffled, length-sorted within windows (less
    padding), then the batches shuffled; a pure function of (lengths, batch, seed, epoch)."""
    rng = random.Random(f"thoughtform-train:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch * _SORT_WINDOW
    batches: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: (-lengths[i], i))
        batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        k = len(e.input_ids)
        ids[r, :k] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[r, :k] = 1
        labels[r, :k] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def load_base(base: str, device: str) -> tuple[Any, Any, Path | str]:
    """The base model (float32, trainable) and tokenizer; a GGUF is dequantized (and cached)."""
    from ..backends.base import BackendError
    from ..backends.transformers import load_model
    from ..models import resolve_model

    try:
        loaded = load_model(base, device=device, dtype="float32", attn_implementation="sdpa")
    except BackendError as e:
        raise TrainError(str(e)) from None
    model = loaded.model
    # A model loaded from GGUF still claims to be quantized, which peft and saving refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, loaded.tokenizer, resolve_model(base)


def trainable_state(model: Any) -> dict[str, Any]:
    """The trainable (LoRA) tensors by parameter name, detached on CPU."""
    return {
        n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / _DONE).exists() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in ``out/checkpoints``, if any."""
    dirs = _checkpoint_dirs(Path(out))
    return dirs[-1] if dirs else None


class Trainer:
    """One training run: set up with a config, then ``run()``; resumes from ``out`` when asked."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.out = Path(cfg.out)
        self._check_settings()

    def _check_settings(self) -> None:
        c = self.cfg
        checks = [
            (c.batch >= 1, f"--batch must be >= 1, got {c.batch}"),
            (c.max_len >= 8, f"--max-len must be >= 8, got {c.max_len}"),
            (c.lora_r >= 1, f"--lora-r must be >= 1, got {c.lora_r}"),
            (c.lora_alpha > 0, f"--lora-alpha must be > 0, got {c.lora_alpha}"),
            (c.lr > 0, f"--lr must be > 0, got {c.lr}"),
            (c.steps is None or c.steps >= 1, f"--steps must be >= 1, got {c.steps}"),
            (c.epochs > 0, f"--epochs must be > 0, got {c.epochs}"),
            (c.save_every >= 1, f"--save-every must be >= 1, got {c.save_every}"),
            (
                c.export_dtype in ("f16", "f32"),
                f"export dtype must be f16 or f32, got {c.export_dtype!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainError(msg)
        if not self.resume and _checkpoint_dirs(self.out):
            raise TrainError(
                f"{self.out} already has checkpoints: pass --resume to continue, or use another --out"
            )
        self._resume_from = latest_checkpoint(self.out) if self.resume else None
        if self.resume:
            # Checked before the model loads, so a wrong --resume fails in a second.
            ck = self._resume_from
            if ck is None:
                raise TrainError(f"--resume: no checkpoint in {self.out / CHECKPOINTS}")
            meta = json.loads((ck / _DONE).read_text(encoding="utf-8"))
            want = self._identity()
            have = meta.get("identity", {})
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            if diff:
                raise TrainError(
                    f"--resume: {ck} was made with different settings ({', '.join(diff)})"
                )

    # ------------------------------------------------------------------ setup

    def _identity(self) -> dict[str, Any]:
        d = self.cfg.identity()
        d["data"] = data_digest(self.cfg.data)
        return d

    def _setup(self) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        c = self.cfg
        self.device = resolve_device(c.device)
        self.threads = c.threads or cores()
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        examples, self.skipped = load_examples(c.data, c.voices)
        model, tok, base_path = load_base(c.base, self.device)
        self.tokenizer = tok
        self.base_path = base_path
        encoded = [encode_chat(tok, m, c.max_len) for m in examples]
        self.examples = [e for e in encoded if e.trained > 0]
        if not self.examples:
            raise TrainError(f"no example has reply tokens within --max-len {c.max_len}")
        self.dropped = len(encoded) - len(self.examples)
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.steps_per_epoch = math.ceil(len(self.examples) / c.batch)
        self.total = c.steps or max(1, math.ceil(c.epochs * self.steps_per_epoch))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        # The LoRA A matrices are drawn from torch's RNG: seed it so a run is reproducible.
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        lcfg = LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=list(c.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lcfg)
        self.model.peft_config["default"].base_model_name_or_path = str(base_path)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.n_trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, c.warmup, self.total, c.min_lr_ratio)
        )
        self.step = 0
        self.losses: list[float] = []
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.resumed_from: int | None = None
        self.loss_before: float | None = None
        if self.resume:
            self._load_latest()
        if self.loss_before is None:
            self.loss_before = self.eval_loss()

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> Path:
        import torch
        from safetensors.torch import save_file

        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(self.model), str(tmp / "adapter.safetensors"))
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {
                "step": self.step,
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "losses": self.losses,
                "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed,
                "loss_before": self.loss_before,
                "rng": rng,
            },
            tmp / "state.pt",
        )
        (tmp / _DONE).write_text(
            json.dumps({"step": self.step, "identity": self._identity()}, indent=1),
            encoding="utf-8",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(self.out)[: -max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_latest(self) -> None:
        import torch
        from safetensors.torch import load_file

        ck = self._resume_from
        assert ck is not None
        tensors = load_file(str(ck / "adapter.safetensors"))
        named = dict(self.model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in tensors]
        if missing or any(n not in named for n in tensors):
            raise TrainError(f"--resume: {ck} does not match this model's LoRA layout")
        with torch.no_grad():
            for n, t in tensors.items():
                named[n].copy_(t.to(named[n].device))
        # weights_only: the state holds tensors, numbers and the RNG tuples, nothing executable.
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed = float(state["elapsed"])
        self.loss_before = state.get("loss_before")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = self.step
        self.log(f"resuming from {ck.name} (step {self.step} of {self.total})")

    # ------------------------------------------------------------------ loop

    def batch_at(self, step: int) -> list[Encoded]:
        """The examples of global step ``step`` (a pure function of the data and the seed)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        plan = epoch_batches(self.lengths, self.cfg.batch, self.cfg.seed, epoch)
        return [self.examples[i] for i in plan[k]]

    def eval_loss(self, limit: int = EVAL_EXAMPLES) -> float:
        """Token-weighted mean loss over a fixed sample of the training examples (no update)."""
        import torch

        order = list(range(len(self.examples)))
        random.Random(f"thoughtform-eval:{self.cfg.seed}").shuffle(order)
        sample = [self.examples[i] for i in order[:limit]]
        total, count = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        # No RNG is consumed here (eval mode: no dropout), so resumed runs stay identical.
        with torch.no_grad():
            for k in range(0, len(sample), self.cfg.batch):
                part = sample[k : k + self.cfg.batch]
                batch = {n: v.to(self.device) for n, v in collate(part, self.pad_id).items()}
                n = sum(max(0, e.trained - (e.labels[0] != IGNORE)) for e in part)
                total += float(self.model(**batch).loss) * n
                count += n
        self.model.train(was_training)
        return total / count if count else float("nan")

    def _train_step(self) -> float:
        import torch

        batch = collate(self.batch_at(self.step), self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.model.train()
        loss = self.model(**batch).loss
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.tokens_seen += int(batch["attention_mask"].sum())
        return float(loss.detach())

    def run(self) -> TrainResult:
        """Train to the last step (checkpointing on the way), save the adapter and training.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._setup()
        self.log(
            f"training {self.n_trainable:,} LoRA parameters on {len(self.examples)} examples, "
            f"{self.total} steps, device {self.device}"
            + (f" ({self.threads} threads)" if self.device == "cpu" else "")
        )
        with _Progress(self.total, self.step, self.progress, self.log) as bar:
            while self.step < self.total:
                t0 = time.perf_counter()
                loss = self._train_step()
                self.elapsed += time.perf_counter() - t0
                self.losses.append(round(loss, 5))
                self.step += 1
                bar.update(self.step, loss)
                if self.step % self.cfg.save_every == 0 and self.step < self.total:
                    self._save_checkpoint()
        self._save_checkpoint()
        self.loss_after = self.eval_loss()
        return self._finish()

    def _finish(self) -> TrainResult:
        adapter_dir = self.out / ADAPTER_DIR
        # No embedding layers are adapted; "auto" would look for a config.json beside the GGUF.
        self.model.save_pretrained(
            str(adapter_dir), safe_serialization=True, save_embedding_layers=False
        )
        gguf: Path | None = None
        if self.cfg.export:
            from .export import export_lora

            gguf = export_lora(
                adapter_dir,
                self.out / ADAPTER_GGUF,
                base=self.base_path,
                dtype=self.cfg.export_dtype,
            )
        if self.cfg.export_merged:
            from .export import merge_lora

            merge_lora(adapter_dir, self.out / MERGED_GGUF, base=self.base_path, dtype="f16")
        report = self._report(gguf)
        (self.out / TRAINING_JSON).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return TrainResult(
            out=self.out,
            adapter_dir=adapter_dir,
            gguf=gguf,
            steps=self.step,
            losses=list(self.losses),
            seconds=self.elapsed,
            resumed_from=self.resumed_from,
            loss_before=self.loss_before,
            loss_after=self.loss_after,
        )

    def _report(self, gguf: Path | None) -> dict[str, Any]:
        import peft
        import torch

        cfg = asdict(self.cfg)
        cfg["target_modules"] = list(self.cfg.target_modules)
        k = max(1, min(10, len(self.losses)))
        return {
            "config": cfg,
            "base_path": str(self.base_path),
            "device": self.device,
            "threads": self.threads if self.device == "cpu" else None,
            "examples": len(self.examples),
            "skipped_lines": self.skipped,
            "dropped_no_reply_tokens": self.dropped,
            "trainable_parameters": self.n_trainable,
            "steps": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "resumed_from": self.resumed_from,
            "loss": self.losses,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_first10": sum(self.losses[:k]) / k,
            "loss_last10": sum(self.losses[-k:]) / k,
            "train_seconds": round(self.elapsed, 2),
            "steps_per_s": round(self.step / self.elapsed, 4) if self.elapsed else None,
            "tokens_per_s": round(self.tokens_seen / self.elapsed, 1) if self.elapsed else None,
            "tokens_seen": self.tokens_seen,
            "adapter_dir": ADAPTER_DIR,
            "gguf": gguf.name if gguf else None,
            "merged_gguf": MERGED_GGUF if self.cfg.export_merged else None,
            "versions": {"torch": torch.__version__, "peft": peft.__version__},
        }


def _as_tuple(x: Any) -> Any:
    """``random.setstate`` wants nested tuples; a round trip through torch.save may give lists."""
    if isinstance(x, list | tuple):
        return tuple(_as_tuple(i) for i in x)
    return x


class _Progress:
    """A rich progress bar with loss and ETA on a terminal; a log line every 10 steps otherwise."""

    def __init__(self, total: int, done: int, enabled: bool, log: Callable[[str], None]) -> None:
        self.total, self.done, self.enabled, self.log = total, done, enabled, log
        self.bar: Any = None
        self.task: Any = None
        self.t0 = time.perf_counter()
        self.start_step = done

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, loss="-")
        return self

    def update(self, step: int, loss: float) -> None:
        """Show step ``step`` done with its loss."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")
        elif step % 10 == 0 or step == self.total:
            dt = time.perf_counter() - self.t0
            rate = (step - self.start_step) / dt if dt > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            self.log(f"step {step}/{self.total} loss {loss:.4f} {rate:.3f} steps/s ETA {eta:.0f}s")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run one LoRA training (see :class:`Trainer`)."""
    return Trainer(cfg, resume=resume, progress=progress).run()
