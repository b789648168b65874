"""Voice vectors without a model: the GGUF layout llama.cpp loads, the cvec buffer, the maths of
the directions on planted data, vector directories, the CLI's errors and the shipped set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

import gguf

from thoughtform.cli import main
from thoughtform.vectors import seed_vectors_dir
from thoughtform.vectors.cvec import (
    ControlVector,
    VectorFileError,
    cvec_buffer,
    load_control_vector,
    write_control_vector,
)
from thoughtform.vectors.sets import (
    load_vector_set,
    shipped_dir,
    shipped_sets,
)
from thoughtform.vectors.train import (
    Features,
    default_layers,
    pair_accuracy,
    paired_differences,
    parse_layers,
    pick_examples,
    train_directions,
    unit_directions,
)
from thoughtform.voices import PRESETS, voice_set_from_dict

N_EMBD = 16


def cv(layers: list[int], seed: int = 0, n: int = N_EMBD, name: str = "V") -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector(
        {il: rng.standard_normal(n).astype(np.float32) for il in layers},
        model_hint="llama",
        name=name,
    )


def llama_cpp_rules(path: Path) -> tuple[int, dict[int, np.ndarray]]:
    """What llama.cpp's common_control_vector_load_one accepts, checked on the raw file."""
    r = gguf.GGUFReader(str(path))
    arch = r.get_field("general.architecture")
    assert arch is not None and arch.contents() == "controlvector"
    assert isinstance(r.get_field("controlvector.model_hint").contents(), str)
    out: dict[int, np.ndarray] = {}
    n_embd = -1
    for t in r.tensors:
        prefix, dot, idx = t.name.partition(".")
        assert prefix == "direction" and dot and idx.isdigit(), t.name
        layer = int(idx)
        assert layer >= 1, "llama.cpp refuses direction.0"
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert len(t.shape) == 1
        n_embd = int(t.shape[0]) if n_embd < 0 else n_embd
        assert int(t.shape[0]) == n_embd, "all directions must have one length"
        out[layer] = np.array(t.data, dtype=np.float32)
    count = r.get_field("controlvector.layer_count").contents()
    assert count == len(out)
    return n_embd, out


def test_written_file_follows_llama_cpp_loader_rules(tmp_path: Path) -> None:
    v = cv([3, 1, 7])
    p = write_control_vector(v, tmp_path / "Doubt.gguf")
    n_embd, raw = llama_cpp_rules(p)
    assert n_embd == N_EMBD and sorted(raw) == [1, 3, 7]
    for il in raw:
        assert np.array_equal(raw[il], v[il])
    back = load_control_vector(p)
    assert back.layers == (1, 3, 7) and back.n_embd == N_EMBD and back.model_hint == "llama"
    assert back.name == "Doubt" and back == ControlVector(v.directions, "llama", "Doubt")


def _raw_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("tensors", "problem"),
    [
        ({"direction.0": np.ones(4, np.float32)}, "layer 0 is never steered"),
        ({"direction.1": np.ones(4, np.float16)}, "must be F32"),
        ({"direction.1": np.ones((2, 4), np.float32)}, "must be 1-D"),
        (
            {"direction.1": np.ones(4, np.float32), "direction.2": np.ones(5, np.float32)},
            "length 5, others have 4",
        ),
        ({"bias.1": np.ones(4, np.float32)}, "not named direction.<layer>"),
        ({"direction.x": np.ones(4, np.float32)}, "not named direction.<layer>"),
        ({}, "no direction tensors"),
    ],
)
def test_loader_refuses_what_llama_cpp_skips(
    tmp_path: Path, tensors: dict[str, np.ndarray], problem: str
) -> None:
    p = _raw_gguf(tmp_path / "bad.gguf", tensors)
    with pytest.raises(VectorFileError, match=problem) as e:
        load_control_vector(p)
    assert str(e.value).startswith(str(p))


def test_loader_errors_for_missing_non_gguf_and_wrong_arch(tmp_path: Path) -> None:
    with pytest.raises(VectorFileError, match="no such control-vector file"):
        load_control_vector(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(VectorFileError, match="not a GGUF file"):
        load_control_vector(junk)
    p = _raw_gguf(tmp_path / "m.gguf", {"direction.1": np.ones(4, np.float32)}, arch="llama")
    with pytest.raises(VectorFileError, match=r"general\.architecture is 'llama'"):
        load_control_vector(p)


def test_cvec_buffer_layout_matches_llama_cpp() -> None:
    a = cv([2, 4], seed=1)
    b = cv([4, 5], seed=2)
    buf, lo, hi = cvec_buffer([(a, 2.0), (b, -0.5)], N_EMBD, n_layer=8)
    assert (lo, hi) == (2, 5)
    assert buf.dtype == np.float32 and buf.shape == (N_EMBD * 5,)
    rows = buf.reshape(5, N_EMBD)  # row il - 1 holds layer il (layer 1 first)
    assert np.all(rows[0] == 0) and np.all(rows[2] == 0)
    assert np.array_equal(rows[1], a[2] * np.float32(2.0))
    assert np.array_equal(rows[3], a[4] * np.float32(2.0) + b[4] * np.float32(-0.5))
    assert np.array_equal(rows[4], b[5] * np.float32(-0.5))


def test_cvec_buffer_nothing_to_apply_and_mismatches() -> None:
    a = cv([2])
    buf, lo, hi = cvec_buffer([], N_EMBD, 8)
    assert buf.size == 0 and (lo, hi) == (-1, -1)
    assert cvec_buffer([(a, 0.0)], N_EMBD, 8)[1:] == (-1, -1)
    with pytest.raises(ValueError, match="length 16, the model 32"):
        cvec_buffer([(a, 1.0)], 32, 8)
    with pytest.raises(ValueError, match=r"layer 8 outside 1\.\.7"):
        cvec_buffer([(cv([8]), 1.0)], N_EMBD, 8)
    with pytest.raises(ValueError, match="layer 0 cannot be steered"):
        ControlVector({0: np.ones(4, np.float32)})


def test_layers_parsing_and_default_band() -> None:
    assert parse_layers("8-22") == (8, 22) and parse_layers("5") == (5, 5)
    assert default_layers(30) == (10, 22)
    for bad in ("0-3", "9-3", "a-b", ""):
        with pytest.raises(Exception, match="--layers"):
            parse_layers(bad)
    with pytest.raises(Exception, match="last layer is 29"):
        parse_layers("20-30", n_layer=30)


def test_pick_examples_is_seeded_and_disjoint() -> None:
    tr, held = pick_examples(100, 40, 0.25, seed=3)
    assert len(tr) == 30 and len(held) == 10 and not set(tr) & set(held)
    assert pick_examples(100, 40, 0.25, seed=3) == (tr, held)
    assert pick_examples(100, 40, 0.25, seed=4) != (tr, held)
    assert sorted(pick_examples(10, 0, 0.0, seed=0)[0]) == list(range(10))


def planted(n_ex: int = 60, seed: int = 0, noise: float = 1.0) -> tuple[Features, np.ndarray]:
    """Replies of 2-3 voices whose means differ by a planted direction per voice."""
    rng = np.random.default_rng(seed)
    n_voices, n_layer = 3, 4
    truth = rng.standard_normal((n_voices, n_layer - 1, N_EMBD))
    means, ex, vo = [], [], []
    for e in range(n_ex):
        context = rng.standard_normal((n_layer - 1, N_EMBD)) * 5  # shared by the reply
        for v in rng.choice(n_voices, size=rng.integers(2, 4), replace=False):
            means.append(context + truth[v] + rng.standard_normal((n_layer - 1, N_EMBD)) * noise)
            ex.append(e)
            vo.append(int(v))
    f = Features(
        means=np.array(means, np.float32),
        example=np.array(ex),
        voice=np.array(vo),
        voices=["A", "B", "C"],
        n_layer=n_layer,
        n_embd=N_EMBD,
    )
    return f, truth


@pytest.mark.parametrize("method", ["mean-diff", "pca-diff"])
def test_directions_recover_the_planted_contrast(method: str) -> None:
    f, truth = planted()
    train, held = set(range(45)), set(range(45, 60))
    diffs = paired_differences(f, 0, train)
    units = unit_directions(diffs, method)  # type: ignore[arg-type]
    want = truth[0] - truth[1:].mean(0)  # A minus the others' average
    for layer in range(3):
        cos = units[layer] @ want[layer] / np.linalg.norm(want[layer])
        assert cos > 0.8, (method, layer, cos)  # points towards A, not away
    acc, n = pair_accuracy(f, 0, units, held)
    assert n > 0 and np.all(acc > 0.9)
    # A random direction separates about half the pairs.
    rand = np.random.default_rng(9).standard_normal(units.shape)
    acc_r, _ = pair_accuracy(f, 0, rand, held)
    assert np.all(acc_r < acc)


def test_train_directions_scale_and_layers() -> None:
    f, _ = planted()
    res = train_directions(f, set(range(45)), set(range(45, 60)), (1, 2), "mean-diff")
    assert set(res) == {"A", "B", "C"}
    r = res["A"]
    assert r.vector.layers == (1, 2) and r.vector.n_embd == N_EMBD
    diffs = paired_differences(f, 0, set(range(45)))
    # Each steered layer carries its mean difference, scaled so that the added vectors sum to
    # about the contrast at the band's last layer.
    m = np.linalg.norm(diffs.mean(0), axis=1)
    share = m[1] / (m[0] + m[1])
    for il in (1, 2):
        np.testing.assert_allclose(r.vector[il], diffs[:, il - 1].mean(0) * share, rtol=1e-4)
    added = np.linalg.norm(r.vector[1]) + np.linalg.norm(r.vector[2])
    assert added == pytest.approx(m[1], rel=1e-4)
    assert set(r.accuracy) == {1, 2} and set(r.accuracy_all) == {1, 2, 3}


def test_vector_set_directory_and_strengths(tmp_path: Path) -> None:
    write_control_vector(cv([1, 2], name="Doubt"), tmp_path / "Doubt.gguf")
    write_control_vector(cv([1, 2], seed=5, name="Echo"), tmp_path / "Echo.gguf")
    vset = load_vector_set(tmp_path)  # no vectors.json: every GGUF, strength 1
    assert sorted(vset.vectors) == ["Doubt", "Echo"] and vset.default_strength("Doubt") == 1.0
    meta = {"voices": {"Doubt": {"file": "Doubt.gguf"}}, "default_strengths": {"Doubt": 0.5}}
    (tmp_path / "vectors.json").write_text(json.dumps(meta), encoding="utf-8")
    vset = load_vector_set(tmp_path)
    assert list(vset.vectors) == ["Doubt"] and vset.get("doubt") is vset.vectors["Doubt"]
    vs = voice_set_from_dict({"voices": [{"name": "Doubt", "vector": -1.25}, "Echo"]})
    assert vset.strength("Doubt") == 0.5  # vectors.json default
    assert vset.strength("Doubt", vs) == -1.25  # the voice set's own field wins
    assert vset.strength("Echo", vs) == 1.0
    (tmp_path / "vectors.json").write_text("{", encoding="utf-8")
    with pytest.raises(VectorFileError, match=r"vectors\.json: cannot read"):
        load_vector_set(tmp_path)
    with pytest.raises(VectorFileError, match="no such vector directory"):
        load_vector_set(tmp_path / "missing")


def test_shipped_seed_vectors_load_and_are_small() -> None:
    assert "seed" in shipped_sets()
    d = shipped_dir("seed")
    assert seed_vectors_dir() == d
    vset = load_vector_set("seed")
    assert set(vset.vectors) == {v.name for v in PRESETS["seed"].voices}
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total < 1_000_000, total
    lo, hi = vset.meta["layers"]
    for name, v in vset.vectors.items():
        n_embd, raw = llama_cpp_rules(d / f"{name}.gguf")
        assert n_embd == 576 and sorted(raw) == list(range(lo, hi + 1))
        assert v.model_hint == "llama"
        assert vset.meta["voices"][name]["heldout_accuracy"] > 0.5


def test_cli_path_list_show_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["vectors", "path", "seed"]) == 0
    assert Path(capsys.readouterr().out.strip()) == shipped_dir("seed")
    assert main(["vectors", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed") and "Doubt" in out
    assert main(["vectors", "show", "seed"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(["vectors", "path", "nope"]) == 2
    assert "nope: not a shipped vector set" in capsys.readouterr().err
    assert main(["vectors", "show", str(tmp_path / "x")]) == 2
    assert "no such vector directory" in capsys.readouterr().err
    assert main(["vectors", "train", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text("", encoding="utf-8")
    assert main(["vectors", "train", str(data), "--out", str(tmp_path), "--layers", "0-3"]) == 2
    assert "--layers '0-3'" in capsys.readouterr().err


def test_cli_help_is_delegated() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "thoughtform.cli", "vectors", "train", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "--method" in r.stdout and "--layers" in r.stdout


def test_cli_strengths_sets_shipped_defaults_byte_for_byte(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import shutil

    src = seed_vectors_dir()
    assert src is not None
    d = tmp_path / "seed"
    shutil.copytree(src, d)
    before = (d / "vectors.json").read_bytes()
    # Setting the strengths a set already has rewrites nothing: rebuilds stay byte-identical.
    current = json.loads(before)["default_strengths"]
    assert main(["vectors", "strengths", str(d), *(f"{k}={v}" for k, v in current.items())]) == 0
    assert (d / "vectors.json").read_bytes() == before
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"default_strength": {"Doubt": 0.5, "pulse": 1.5}}))
    assert main(["vectors", "strengths", str(d), "Echo=-2", "--from-eval", str(ev)]) == 0
    capsys.readouterr()
    vset = load_vector_set(d)
    assert (vset.default_strength("Doubt"), vset.default_strength("Pulse")) == (0.5, 1.5)
    assert vset.default_strength("Echo") == -2.0 and vset.default_strength("Shift") == 1.0
    for bad, msg in [
        (["Nobody=1"], "Nobody: no vector for this voice"),
        (["Doubt=9"], "Doubt: strength 9.0 is not a number in -4..4"),
        (["Doubt=nan"], "is not a number in -4..4"),
        (["Doubt"], "Doubt: VOICE=STRENGTH is required"),
        ([], "give VOICE=S pairs or --from-eval FILE"),
        (["--from-eval", str(tmp_path / "none.json")], "none.json: cannot read"),
    ]:
        assert main(["vectors", "strengths", str(d), *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert load_vector_set(d).default_strength("Doubt") == 0.5  # a refused call changed nothing
