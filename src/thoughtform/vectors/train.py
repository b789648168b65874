"""Train one steering direction per voice per layer from a voices dataset, with transformers.

For every assistant reply, the model reads the chat-templated prompt and reply once; a forward
hook on each decoder block records its output (the residual stream llama.cpp's control vectors
add to: ``direction.<il>`` lands on block ``il``'s output). Each voice's segment is summarised
by the mean over its content tokens (markers and blank lines excluded). The contrast for voice
V in one reply is V's mean minus the mean of the other voices' means in the *same* reply, so
prompt, topic and model state are shared by both sides (the "same context" of the issue).

* ``mean-diff``: the direction is the mean of those paired differences.
* ``pca-diff``: the first principal axis of the paired differences (repeng's ``pca_diff``),
  taken uncentred (the top right singular vector): sklearn's PCA, which repeng calls, centres
  the differences first and so removes the very mean shift every pair shares. Sign: towards V.

Scale: a vector added at every steered block accumulates in the residual stream, so each layer's
direction is its own contrast m_l (the mean paired difference's projection on it) x
m_last / sum(m_l): the added vectors sum to about m_last, the voice contrast the model itself
has at the band's last layer. Strength 1 shifts the stream by about one natural voice contrast
there, strength 2 doubles it. (Measured on SmolLM2-135M: the contrast is about a tenth of the
residual's norm at each layer, Pulse's about a quarter.)

Held-out check: a seeded share of the replies is kept out of training; for each held-out reply
with V and another voice W, the pair counts as separated when V's segment projects further on
V's direction than W's does. The per-voice share of separated pairs is reported per layer.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .cvec import ControlVector

Method = Literal["mean-diff", "pca-diff"]
METHODS: tuple[Method, ...] = ("mean-diff", "pca-diff")
DEFAULT_METHOD: Method = "mean-diff"
DEFAULT_MAX_EXAMPLES = 400
DEFAULT_HOLDOUT = 0.2
MIN_PAIRS = 8  # a voice needs this many training replies shared with another voice


class VectorTrainError(RuntimeError):
    """Vectors cannot be trained (bad data, bad settings)."""


@dataclass
class VectorTrainConfig:
    """Everything that defines a vector-training run."""

    data: list[str]
    out: str
    voices: str = "seed"
    base: str = "embedded"
    layers: tuple[int, int] | None = None  # inclusive; None: the default band for the model
    method: Method = DEFAULT_METHOD
    seed: int = 0
    max_examples: int = DEFAULT_MAX_EXAMPLES
    holdout: float = DEFAULT_HOLDOUT
    max_len: int = 256
    threads: int | None = None


@dataclass
class Features:
    """Per (reply, voice) mean hidden state at every block output 1..n_layer-1."""

    means: np.ndarray  # (items, n_layer - 1, n_embd) float32; layer il at index il - 1
    example: np.ndarray  # (items,) reply index
    voice: np.ndarray  # (items,) index into ``voices``
    voices: list[str]
    n_layer: int
    n_embd: int
    tokens: int = 0  # content tokens read
    model_hint: str = ""


@dataclass
class VoiceResult:
    """One voice's trained vector and how well it separates held-out replies."""

    vector: ControlVector
    pairs: int  # training replies with this voice and another
    heldout_pairs: int
    accuracy: dict[int, float]  # held-out pair accuracy per steered layer
    accuracy_all: dict[int, float] = field(default_factory=dict)  # per block output 1..n-1


def parse_layers(spec: str, n_layer: int | None = None) -> tuple[int, int]:
    """``"8-22"`` (inclusive) or ``"12"``; layer 0 is never steered, the last is ``n_layer - 1``."""
    s = spec.strip()
    a, sep, b = s.partition("-")
    try:
        lo = int(a)
        hi = int(b) if sep else lo
    except ValueError:
        raise VectorTrainError(f"--layers {spec!r}: expected A-B, e.g. 8-22") from None
    if lo < 1 or hi < lo:
        raise VectorTrainError(f"--layers {spec!r}: need 1 <= A <= B (layer 0 is never steered)")
    if n_layer is not None and hi > n_layer - 1:
        raise VectorTrainError(f"--layers {spec!r}: this model's last layer is {n_layer - 1}")
    return lo, hi


def default_layers(n_layer: int) -> tuple[int, int]:
    """The steered band when none is given: the middle of the stack, a third in to three quarters."""
    lo = max(1, round(n_layer / 3))
    hi = max(lo, min(n_layer - 1, round(n_layer * 3 / 4)))
    return lo, hi


def data_hash(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the dataset files' bytes."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def pick_examples(n: int, cap: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded choice of at most ``cap`` of ``n`` replies, split into (train, held-out) indices."""
    rng = random.Random(f"thoughtform-vectors:{seed}")
    order = list(range(n))
    rng.shuffle(order)
    order = order[: max(0, cap)] if cap else order
    n_held = round(len(order) * holdout)
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return train, held


# ---------------------------------------------------------------------------- token labels


def label_reply(
    tokenizer: Any, content: str, voice_names: Sequence[str], vs: Any
) -> tuple[list[int], list[int]]:
    """Token ids of ``content`` (as training tokenizes it) and, per token, the voice index or -1.

    A token is a voice's when it lies wholly inside that voice's segment and is not blank, so
    markers (``[Doubt]``), the newline after them and the blank lines between voices are out.
    """
    from ..parse import parse_text

    try:
        enc = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        raise VectorTrainError("vectors train needs a fast tokenizer (token offsets)") from None
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    index = {n: i for i, n in enumerate(voice_names)}
    spans = []
    for seg in parse_text(content, vs):
        v = vs.get(seg.voice)
        if v is None or v.name not in index:
            continue
        spans.append((seg.start, seg.end, index[v.name]))
    labels = [-1] * len(ids)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and spans[k][0] <= a and b <= spans[k][1] and content[a:b].strip():
            labels[t] = spans[k][2]
    return ids, labels


# ---------------------------------------------------------------------------- features


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a causal LM (``model.model.layers`` for Llama-likes)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise VectorTrainError(f"cannot find the decoder layers of {type(model).__name__}")


def _block_output(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def extract_features(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    vs: Any,
    max_len: int = 256,
    progress: Callable[[int], None] | None = None,
) -> Features:
    """Mean block outputs per (reply, voice) over each voice's content tokens."""
    import torch

    voice_names = [v.name for v in vs.voices]
    layers = decoder_layers(model)
    n_layer = len(layers)
    n_embd = int(model.config.hidden_size)
    captured: list[Any] = [None] * n_layer

    def hook(il: int) -> Callable[..., None]:
        def f(_m: Any, _i: Any, out: Any) -> None:
            captured[il] = _block_output(out)[0].detach()

        return f

    # The decoder stack without the LM head: its 49k x 576 projection per position is a fifth
    # of SmolLM2-135M's forward cost and nothing here reads logits.
    body = getattr(model, "base_model", model)
    handles = [layers[il].register_forward_hook(hook(il)) for il in range(1, n_layer)]
    means: list[np.ndarray] = []
    ex_idx: list[int] = []
    v_idx: list[int] = []
    tokens = 0
    try:
        for e, messages in enumerate(conversations):
            for i, m in enumerate(messages):
                if m.get("role") != "assistant":
                    continue
                head = tokenizer.apply_chat_template(
                    list(messages[:i]), tokenize=False, add_generation_prompt=True
                )
                # The template holds the special tokens: never let the tokenizer add a BOS.
                prompt = list(tokenizer(head, add_special_tokens=False)["input_ids"])
                reply, labels = label_reply(tokenizer, m["content"], voice_names, vs)
                ids = (prompt + reply)[:max_len]
                lab = np.array(([-1] * len(prompt) + labels)[:max_len])
                present = sorted({int(x) for x in lab if x >= 0})
                if len(present) < 1:
                    continue
                with torch.no_grad():
                    body(input_ids=torch.tensor([ids]), use_cache=False)
                stack = torch.stack([captured[il] for il in range(1, n_layer)])  # (L-1, T, D)
                for v in present:
                    sel = torch.from_numpy(np.flatnonzero(lab == v))
                    means.append(stack[:, sel, :].double().mean(dim=1).float().numpy())
                    ex_idx.append(e)
                    v_idx.append(v)
                tokens += int((lab >= 0).sum())
            if progress is not None:
                progress(1)
    finally:
        for h in handles:
            h.remove()
    arr = np.stack(means) if means else np.zeros((0, n_layer - 1, n_embd), np.float32)
    return Features(
        means=arr,
        example=np.array(ex_idx, dtype=np.int64),
        voice=np.array(v_idx, dtype=np.int64),
        voices=voice_names,
        n_layer=n_layer,
        n_embd=n_embd,
        tokens=tokens,
        model_hint=str(getattr(model.config, "model_type", "") or ""),
    )


# ---------------------------------------------------------------------------- directions


def paired_differences(f: Features, v: int, examples: set[int] | None = None) -> np.ndarray:
    """(pairs, n_layer - 1, n_embd): voice ``v``'s mean minus the other voices' in each reply."""
    rows: list[np.ndarray] = []
    by_ex: dict[int, list[int]] = {}
    for k, e in enumerate(f.example.tolist()):
        if examples is None or e in examples:
            by_ex.setdefault(e, []).append(k)
    for e in sorted(by_ex):
        items = by_ex[e]
        mine = [k for k in items if f.voice[k] == v]
        others = [k for k in items if f.voice[k] != v]
        if not mine or not others:
            continue
        rows.append(
            f.means[mine[0]].astype(np.float64) - f.means[others].astype(np.float64).mean(0)
        )
    if not rows:
        return np.zeros((0, f.n_layer - 1, f.n_embd))
    return np.stack(rows)


def unit_directions(diffs: np.ndarray, method: Method) -> np.ndarray:
    """(n_layer - 1, n_embd) unit directions from paired differences, pointing towards the voice."""
    mean = diffs.mean(axis=0)
    if method == "mean-diff":
        u = mean
    elif method == "pca-diff":
        u = np.empty_like(mean)
        for layer in range(diffs.shape[1]):
            # Top right singular vector of the uncentred differences.
            _, _, vt = np.linalg.svd(diffs[:, layer, :], full_matrices=False)
            d = vt[0]
            u[layer] = d if float(d @ mean[layer]) >= 0 else -d
    else:
        raise VectorTrainError(f"unknown method {method!r} (use {' or '.join(METHODS)})")
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    return u / np.where(norms > 0, norms, 1.0)


def pair_accuracy(
    f: Features, v: int, units: np.ndarray, examples: set[int]
) -> tuple[np.ndarray, int]:
    """Per layer, the share of (V, W) segment pairs in the same reply where V projects further."""
    by_ex: dict[int, list[int]] = {}
    for k, e in enumerate(f.example.tolist()):
        if e in examples:
            by_ex.setdefault(e, []).append(k)
    wins = np.zeros(units.shape[0])
    n = 0
    for e in sorted(by_ex):
        items = by_ex[e]
        mine = [k for k in items if f.voice[k] == v]
        if not mine:
            continue
        pv = np.einsum("ld,ld->l", f.means[mine[0]], units)
        for k in items:
            if f.voice[k] == v:
                continue
            pw = np.einsum("ld,ld->l", f.means[k], units)
            wins += pv > pw
            n += 1
    return (wins / n if n else np.full(units.shape[0], np.nan)), n


def train_directions(
    f: Features,
    train: set[int],
    held: set[int],
    layers: tuple[int, int],
    method: Method,
) -> dict[str, VoiceResult]:
    """One control vector per voice with enough training pairs, and its held-out accuracy."""
    lo, hi = layers
    steered = list(range(lo, hi + 1))
    out: dict[str, VoiceResult] = {}
    for v, name in enumerate(f.voices):
        diffs = paired_differences(f, v, train)
        if len(diffs) < MIN_PAIRS:
            continue
        units = unit_directions(diffs, method)
        # The mean difference's projection on the unit direction: one contrast per layer.
        proj = np.einsum("pld,ld->l", diffs, units) / len(diffs)
        band = proj[lo - 1 : hi]
        total = float(band.sum())
        share = float(band[-1]) / total if total > 0 else 1.0 / len(steered)
        acc, n_held = pair_accuracy(f, v, units, held) if held else (np.full(len(units), np.nan), 0)
        directions = {
            il: (units[il - 1] * proj[il - 1] * share).astype(np.float32) for il in steered
        }
        out[name] = VoiceResult(
            vector=ControlVector(directions, model_hint=f.model_hint, name=name),
            pairs=len(diffs),
            heldout_pairs=n_held,
            accuracy={il: float(acc[il - 1]) for il in steered},
            accuracy_all={il: float(acc[il - 1]) for il in range(1, f.n_layer)},
        )
    return out


# ---------------------------------------------------------------------------- whole run


def load_base(base: str) -> tuple[Any, Any]:
    """The base model (float32, eval mode, CPU) and tokenizer; a GGUF loads via the safetensors cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from ..backends.base import BackendError
    from ..backends.transformers import load_model

    try:
        loaded = load_model(base, device="cpu", dtype="float32", attn_implementation="sdpa")
    except BackendError as e:
        raise VectorTrainError(str(e)) from None
    return loaded.model, loaded.tokenizer


@dataclass
class TrainOutcome:
    """What a run produced: per-voice results plus the facts vectors.json records."""

    results: dict[str, VoiceResult]
    features: Features
    train_examples: int
    heldout_examples: int
    layers: tuple[int, int]
    seconds: float
    skipped: int = 0


def run_training(
    cfg: VectorTrainConfig,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> TrainOutcome:
    """Load data and model (unless ``loaded`` gives model and tokenizer), extract features and
    train directions; nothing is written."""
    from ..train.lora import load_examples
    from ..voices import VoiceSetError, resolve_voice_set

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.method not in METHODS:
        raise VectorTrainError(f"--method {cfg.method!r}: use {' or '.join(METHODS)}")
    if not 0 <= cfg.holdout < 1:
        raise VectorTrainError(f"--holdout must be in [0, 1), got {cfg.holdout}")
    if cfg.max_examples < 0:
        raise VectorTrainError(f"--max-examples must be >= 0, got {cfg.max_examples}")
    try:
        vs = resolve_voice_set(cfg.voices)
    except VoiceSetError as e:
        raise VectorTrainError(str(e)) from None
    if len(vs.voices) < 2:
        raise VectorTrainError(f"voice set {vs.name!r} needs at least 2 voices to contrast")
    from ..train.lora import TrainError

    try:
        conversations, skipped = load_examples(cfg.data, cfg.voices)
    except TrainError as e:
        raise VectorTrainError(str(e)) from None
    if cfg.layers is not None:
        parse_layers(f"{cfg.layers[0]}-{cfg.layers[1]}")
    t0 = time.perf_counter()
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = loaded if loaded is not None else load_base(cfg.base)
    n_layer = len(decoder_layers(model))
    layers = cfg.layers or default_layers(n_layer)
    parse_layers(f"{layers[0]}-{layers[1]}", n_layer)
    train_idx, held_idx = pick_examples(len(conversations), cfg.max_examples, cfg.holdout, cfg.seed)
    chosen = sorted(train_idx + held_idx)
    picked = [conversations[i] for i in chosen]
    # Features index replies by position in ``picked``; map the split onto those positions.
    pos = {e: k for k, e in enumerate(chosen)}
    train = {pos[e] for e in train_idx}
    held = {pos[e] for e in held_idx}
    say(f"reading {len(picked)} replies ({len(train)} train, {len(held)} held out) ...")
    feats = _extract_with_progress(model, tok, picked, vs, cfg.max_len, progress)
    results = train_directions(feats, train, held, layers, cfg.method)
    if not results:
        raise VectorTrainError(
            f"no voice of {vs.name!r} has {MIN_PAIRS} replies shared with another voice in the data"
        )
    return TrainOutcome(
        results=results,
        features=feats,
        train_examples=len(train),
        heldout_examples=len(held),
        layers=layers,
        seconds=time.perf_counter() - t0,
        skipped=skipped,
    )


def _extract_with_progress(
    model: Any, tok: Any, picked: Sequence[Any], vs: Any, max_len: int, progress: bool
) -> Features:
    if not progress:
        return extract_features(model, tok, picked, vs, max_len)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("hidden states", total=len(picked))
        return extract_features(
            model, tok, picked, vs, max_len, progress=lambda k: bar.advance(task, k)
        )
