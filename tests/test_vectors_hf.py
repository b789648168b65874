"""Voice vectors with transformers on the embedded SmolLM2: token labels, switching hooks at the
right token, and a tiny train -> export -> read-back run (deterministic for a seed)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch

from thoughtform.cli import main
from thoughtform.data.synth import write_synth
from thoughtform.vectors.cvec import ControlVector, load_control_vector
from thoughtform.vectors.hooks import VectorHooks
from thoughtform.vectors.train import (
    VectorTrainConfig,
    decoder_layers,
    label_reply,
    load_base,
    run_training,
)
from thoughtform.voices import PRESETS

pytestmark = pytest.mark.model
SEED = PRESETS["seed"]


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[Any, Any]]:
    torch.set_num_threads(1)  # shared cores: more threads spin and run slower
    yield load_base("embedded")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("vec") / "synth.jsonl"
    write_synth(p, "seed", n=24, seed=1)
    return p


def test_labels_cover_voice_content_only(loaded: tuple[Any, Any]) -> None:
    _, tok = loaded
    content = "[Doubt]\nIs that so? Who says?\n\n[Pulse]\nA breath.\n[/Pulse]\nafter [x]"
    names = [v.name for v in SEED.voices]
    ids, labels = label_reply(tok, content, names, SEED)
    assert ids == tok(content, add_special_tokens=False)["input_ids"]
    by_voice: dict[str, str] = {}
    for t, lab in zip(ids, labels, strict=True):
        if lab >= 0:
            by_voice[names[lab]] = by_voice.get(names[lab], "") + tok.decode([t])
    assert set(by_voice) == {"Doubt", "Pulse"}
    assert by_voice["Doubt"].split() == "Is that so? Who says?".split()
    assert by_voice["Pulse"].strip() == "A breath."
    marker = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab < 0])
    assert "[Doubt]" in marker and "[Pulse]" in marker and "after" in marker


def _decode(
    model: Any, ids: list[int], hooks: VectorHooks | None = None, k: int = -1, m: int = -1
) -> dict[int, list[Any]]:
    """Token-by-token over the KV cache, steering with ``hooks`` ("Doubt" x 2) from token ``k``
    until token ``m``; the last position's output of blocks 5 and 20 per token."""
    from transformers import DynamicCache

    seen: dict[int, list[Any]] = {5: [], 20: []}

    def catch(il: int) -> Any:
        def f(_m: Any, _i: Any, out: Any) -> None:
            seen[il].append((out[0] if isinstance(out, tuple) else out)[0, -1].clone())

        return f

    # Registered after the vector hooks, so these see the steered block outputs.
    handles = [decoder_layers(model)[il].register_forward_hook(catch(il)) for il in seen]
    # transformers 5 renamed past_key_values to cache; accept either.
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        cache = DynamicCache()
        with torch.no_grad():
            for i, t in enumerate(ids):
                if hooks is not None and i == k:
                    hooks.set("Doubt", 2.0)
                    assert hooks.active == (("Doubt", 2.0),)
                if hooks is not None and i == m:
                    hooks.clear()
                    assert hooks.active == ()
                model(input_ids=torch.tensor([[t]]), use_cache=True, **{kw: cache})
    finally:
        for h in handles:
            h.remove()
    return seen


def test_hooks_switch_at_the_token_they_are_set(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    rng = np.random.default_rng(0)
    d = {il: rng.standard_normal(576).astype(np.float32) for il in (5, 6)}
    vec = ControlVector(d, name="Doubt")
    ids = tok("The sea is blue and the sky is grey today.", add_special_tokens=False)["input_ids"]
    base = _decode(model, ids)
    k, m = 4, 8  # set at token k, cleared at token m
    with VectorHooks(model, {"Doubt": vec}) as hooks:
        got = _decode(model, ids, hooks, k, m)
        with pytest.raises(KeyError, match="Pulse"):
            hooks.set("Pulse", 1.0)
    for i in range(k):  # before the switch: bit-identical
        assert torch.equal(got[5][i], base[5][i]) and torch.equal(got[20][i], base[20][i])
    # From the switch on, block 5's output is the model's own plus exactly 2 x direction: block 5
    # is the first steered block, so nothing it reads has changed.
    for i in range(k, m):
        delta = got[5][i] - base[5][i]
        assert torch.allclose(delta, torch.from_numpy(d[5]) * 2.0, atol=1e-4)
        assert not torch.allclose(got[20][i], base[20][i], atol=1e-2)
    # After clear() nothing is added: block 5 (whose attention reads block 4's unsteered K/V) is
    # the model's own again, while block 20 still differs because the tokens steered earlier
    # keep their activations in the KV cache.
    for i in range(m, len(ids)):
        assert torch.allclose(got[5][i], base[5][i], atol=1e-5)
        assert not torch.allclose(got[20][i], base[20][i], atol=1e-3)


def test_hooks_sum_and_remove_restores_the_model(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    ids = torch.tensor([tok("Hello there", add_special_tokens=False)["input_ids"]])
    rng = np.random.default_rng(1)
    a = ControlVector({3: rng.standard_normal(576).astype(np.float32)}, name="A")
    b = ControlVector({3: rng.standard_normal(576).astype(np.float32)}, name="B")
    c = ControlVector({3: (a[3] * 0.5 + b[3] * -1.0).astype(np.float32)}, name="C")
    with torch.no_grad():
        base = model(input_ids=ids).logits
        hooks = VectorHooks(model, {"A": a, "B": b, "C": c}).install()
        hooks.set_many([("A", 0.5), ("B", -1.0)])
        both = model(input_ids=ids).logits
        hooks.set("C", 1.0)
        summed = model(input_ids=ids).logits
        hooks.remove()
        after = model(input_ids=ids).logits
    assert torch.allclose(both, summed, atol=1e-4) and not torch.allclose(both, base, atol=1e-3)
    assert torch.equal(after, base)
    with pytest.raises(ValueError, match="length 4"):
        VectorHooks(model, {"X": ControlVector({1: np.ones(4, np.float32)})})


def test_tiny_training_run_is_deterministic(
    loaded: tuple[Any, Any], data: Path, tmp_path: Path
) -> None:
    cfg = VectorTrainConfig(
        data=[str(data)], out=str(tmp_path), layers=(8, 10), max_examples=20, max_len=128
    )
    one = run_training(cfg, progress=False, log=lambda s: None, loaded=loaded)
    two = run_training(cfg, progress=False, log=lambda s: None, loaded=loaded)
    assert one.results and set(one.results) == set(two.results)
    for name, r in one.results.items():
        assert r.vector == two.results[name].vector and r.vector.layers == (8, 9, 10)
        assert r.pairs >= 8
    cfg2 = VectorTrainConfig(
        data=[str(data)], out=str(tmp_path), layers=(8, 10), max_examples=20, max_len=128, seed=5
    )
    other = run_training(cfg2, progress=False, log=lambda s: None, loaded=loaded)
    some = next(iter(set(one.results) & set(other.results)))
    assert not np.array_equal(one.results[some].vector[8], other.results[some].vector[8])


def test_cli_train_writes_llama_cpp_files(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "vec"
    rc = main(
        [
            "vectors", "train", str(data), "--out", str(out), "--layers", "3-4",
            "--max-examples", "20", "--max-len", "128", "--quiet", "--threads", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "vectors.json").read_text(encoding="utf-8"))
    assert meta["method"] in ("mean-diff", "pca-diff") and meta["layers"] == [3, 4]
    assert meta["n_embd"] == 576 and meta["n_layer"] == 30 and meta["model_hint"] == "llama"
    assert len(meta["data"]["sha256"]) == 64 and meta["data"]["files"] == ["synth.jsonl"]
    assert meta["voices"] and set(meta["default_strengths"]) == set(meta["voices"])
    for voice, info in meta["voices"].items():
        cv = load_control_vector(out / info["file"])
        assert cv.layers == (3, 4) and cv.n_embd == 576
        for il, norm in info["norms"].items():
            assert abs(float(np.linalg.norm(cv[int(il)])) - norm) < 1e-3
        assert set(info["heldout_accuracy_by_layer"]) == {str(i) for i in range(1, 30)}
        assert voice in {v.name for v in SEED.voices}
