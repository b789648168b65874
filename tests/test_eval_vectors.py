"""``eval vectors``: the measures and default choice on hand-built results, the plot, usage
errors, and one tiny real run (2 prompts, 2 voices, strengths 0 and 1) on the embedded model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thoughtform.cli import main
from thoughtform.evaluate.vectors import (
    RunResult,
    choose_default,
    curves_svg,
    steered_trace,
    summarize,
    token_logprobs,
)
from thoughtform.voices import PRESETS

SEED = PRESETS["seed"]
TINY = Path(__file__).parent / "fixtures" / "train" / "tiny.jsonl"


def rr(voice: str, s: float, labels: list[str], p: float | None, nll: float, n: int) -> RunResult:
    return RunResult(voice, s, 0, [1, 2], ["x"] * len(labels), labels, p, nll, n)


def test_summarize_curves_gain_ratio_and_default() -> None:
    results = [
        rr("Doubt", 0.0, ["Doubt", "Echo"], 0.2, 2 * 10, 10),  # share 0.5, ppl e^2
        rr("Doubt", 0.0, ["Echo"], None, 0.0, 0),
        rr("Doubt", 1.0, ["Doubt", "Doubt", "Echo"], 0.4, 2.2 * 10, 10),  # 0.667, ratio e^.2
        rr("Doubt", 2.0, ["Doubt", "Doubt", "Doubt"], 0.6, 3 * 10, 10),  # 1.0, ratio e^1 > 1.5
        rr("Pulse", 0.0, ["Pulse"], 0.1, 10.0, 10),
        rr("Pulse", 1.0, ["Echo"], 0.1, 10.0, 10),  # loses character: default stays 0
        rr("Pulse", 2.0, ["Echo"], None, 10.0, 10),
    ]
    s = summarize(results, ["Doubt", "Pulse"], [1.0, 0.0, 2.0], n_prompts=2, chance=0.125)
    d = s["per_voice"]["Doubt"]
    assert d["strengths"] == [0.0, 1.0, 2.0]
    assert d["class_share"] == [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4), 1.0]
    assert d["class_gain"][1] == pytest.approx(1 / 3, abs=1e-4)
    assert d["p_next"] == [0.2, 0.4, 0.6] and d["boundaries"] == [1, 1, 1]
    assert d["ppl"][0] == pytest.approx(math.exp(2), abs=1e-3)
    assert d["ppl_ratio"] == [
        1.0,
        pytest.approx(math.exp(0.2), abs=1e-3),
        pytest.approx(math.e, abs=1e-3),
    ]
    assert d["segments"] == [3, 3, 3] and d["tokens"] == [10, 10, 10]
    assert d["default_strength"] == 1.0  # 2.0 gains more but costs ppl ratio e > 1.5
    p = s["per_voice"]["Pulse"]
    assert p["default_strength"] == 0.0 and p["class_gain"] == [0.0, -1.0, -1.0]
    assert p["p_next"][2] is None and p["boundaries"][2] == 0
    assert s["default_strength"] == {"Doubt": 1.0, "Pulse": 0.0}
    assert s["mean_class_gain"] == pytest.approx((1 / 3 + 0) / 2, abs=1e-4)
    assert s["ppl_ratio"] == pytest.approx((math.exp(0.2) + 1) / 2, abs=1e-3)


def test_choose_default_ties_go_to_the_smaller_strength() -> None:
    assert choose_default([0, 1, 2], [0.0, 0.2, 0.2], [1.0, 1.1, 1.2]) == 1.0
    assert choose_default([0, 1], [0.0, 0.3], [1.0, None]) == 0.0
    assert choose_default([0, 1], [0.0, -0.1], [1.0, 1.0]) == 0.0


def test_run_result_round_trips_through_its_save_record() -> None:
    r = RunResult("Doubt", 1.5, 3, [5, 6], ["a"], ["Echo"], 0.25, 4.5, 2, "[Doubt]\na")
    assert RunResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_plot_escapes_names_and_draws_a_line_per_voice() -> None:
    bad = '<script>alert(1)</script>"'
    curve = {"class_share": [0.1, 0.5], "p_next": [None, 0.2], "ppl_ratio": [1.0, 1.4]}
    summary: dict[str, Any] = {
        "strengths": [0.0, 1.0],
        "per_voice": {"Doubt": curve, bad: curve},
        "max_ppl_ratio": 1.5,
    }
    svg = curves_svg(summary, {"Doubt": "#112233", bad: 'red" onload="x'})
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert 'onload="x' not in svg and 'stroke="#112233"' in svg
    assert svg.count("<polyline") == 6  # 2 voices x 3 panels (one point still makes a line)


def test_summarize_saved_replies_pools_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(rr("Doubt", 0.0, ["Echo"], 0.1, 10.0, 10).to_dict()) + "\n")
    r1 = rr("Doubt", 1.0, ["Doubt"], 0.3, 11.0, 10)
    r1.prompt = 1
    r1.text = "line\u2028separator\x1cfile\x85next"  # model text: not line ends in JSONL
    b.write_text(json.dumps(r1.to_dict(), ensure_ascii=False) + "\n\n")
    plot = tmp_path / "c.svg"
    argv = ["eval", "vectors", "--summarize", str(a), str(b), "--plot", str(plot), "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["replies"] == 2 and s["n_prompts"] == 2 and s["strengths"] == [0.0, 1.0]
    assert s["per_voice"]["Doubt"]["class_gain"] == [0.0, 1.0]
    assert s["default_strength"] == {"Doubt": 1.0} and s["mean_class_gain"] == 1.0
    assert plot.read_text(encoding="utf-8").startswith("<svg")
    b.write_text("{not json\n")
    assert main(["eval", "vectors", "--summarize", str(b)]) == 2
    assert f"{b}:1: not a saved reply" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-prompts", "0"], "--n-prompts must be >= 1"),
        (["--strengths", "0,x"], "--strengths: not a number: x"),
        (["--voices-subset", "Nobody"], "--voices-subset: unknown voice 'Nobody'"),
        (["--vectors", "/nonexistent/vecs"], "/nonexistent/vecs: no such vector directory"),
        (["--prompts", "/nonexistent/p.txt"], "/nonexistent/p.txt: no such file"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    ],
)
def test_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    vecs = write_vectors(tmp_path / "v", ["Doubt"])
    argv = ["eval", "vectors", "--vectors", str(vecs), *args]
    if "--vectors" in args:
        argv = ["eval", "vectors", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def write_vectors(d: Path, voices: list[str], scale: float = 0.4) -> Path:
    """Seeded random directions on the middle layers: the eval measures whatever it is given."""
    from thoughtform.vectors.cvec import ControlVector, write_control_vector

    rng = np.random.default_rng(7)
    for v in voices:
        dirs = {il: (rng.standard_normal(576) * scale).astype(np.float32) for il in range(10, 21)}
        write_control_vector(ControlVector(dirs, name=v), d / f"{v}.gguf")
    return d


# ------------------------------------------------------------------------ on the real model


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from thoughtform.backends import create_backend

    b = create_backend("llamacpp", n_ctx=1024, seed=0)
    yield b
    b.close()


def request(prompt: str, max_tokens: int = 24) -> Any:
    from thoughtform.backends.base import GenerationRequest, Sampling
    from thoughtform.conversation import build_messages

    return GenerationRequest(
        messages=build_messages(SEED, [("user", prompt)]),
        sampling=Sampling(temperature=0.7, seed=3, max_tokens=max_tokens),
        alternatives=0,
    )


@pytest.mark.model
def test_strength_zero_is_no_vector_and_one_is_not(backend: Any, tmp_path: Path) -> None:
    from thoughtform.generate import Generation
    from thoughtform.steer import SteerPlan

    vecs = str(write_vectors(tmp_path / "v", ["Doubt"]))
    req = request("Why is the sky blue?")
    plain = Generation(backend, req, SEED, steer=SteerPlan(next_voice="Doubt")).run()
    zero = Generation(
        backend, req, SEED, steer=SteerPlan("Doubt", vectors={"Doubt": 0.0}, vector_dir=vecs)
    ).run()
    one = steered_trace(backend, req, SEED, "Doubt", 1.0, vecs)
    ids = lambda t: [r.token_id for r in t.tokens]  # noqa: E731
    assert ids(plain) == ids(zero) == ids(steered_trace(backend, req, SEED, "Doubt", 0.0, vecs))
    assert plain.text.startswith("[Doubt]") and one.text.startswith("[Doubt]")
    assert ids(one) != ids(plain)
    assert any(r.vector for r in one.tokens) and not any(r.vector for r in zero.tokens)
    # The unsteered scorer gives the unsteered run its own log-probabilities back, up to the
    # numerics of batched vs one-token decoding (measured: up to ~0.06 nats on a token); a
    # position off by one would be off by whole nats.
    lps = np.array(token_logprobs(backend, backend.prompt_ids(req), ids(plain)))
    own = np.array([float(r.logprob or 0.0) for r in plain.tokens])
    assert lps.shape == own.shape and np.abs(lps - own).max() < 0.25
    assert abs(lps.sum() - own.sum()) < 0.05 * abs(own.sum()) + 0.5


@pytest.mark.model
def test_tiny_real_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vecs = write_vectors(tmp_path / "v", ["Doubt", "Pulse"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("Why is the sky blue?\nWhat should I cook tonight?\n", encoding="utf-8")
    save, plot = tmp_path / "runs.jsonl", tmp_path / "curves.svg"
    argv = ["eval", "vectors", "--prompts", str(prompts), "--vectors", str(vecs)]
    argv += ["--voices-subset", "Doubt,Pulse", "--strengths", "1", "--dataset", str(TINY)]
    argv += ["--max-tokens", "24", "--json", "--save", str(save), "--plot", str(plot)]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert {"per_voice", "default_strength", "mean_class_gain", "ppl_ratio"} <= set(s)
    assert s["strengths"] == [0.0, 1.0] and s["n_prompts"] == 2
    assert set(s["per_voice"]) == {"Doubt", "Pulse"} == set(s["default_strength"])
    for c in s["per_voice"].values():
        assert c["strengths"] == [0.0, 1.0]
        assert all(x is None or 0.0 <= x <= 1.0 for x in c["class_share"] + c["p_next"])
        assert c["ppl_ratio"][0] == 1.0 and all(x is None or x > 0 for x in c["ppl_ratio"])
        assert all(x is not None and x >= 1.0 for x in c["ppl"])
        assert c["segments"][0] >= 2 and c["tokens"][0] > 0  # every reply opens the voice
        assert c["default_strength"] in (0.0, 1.0)
    assert -1.0 <= s["mean_class_gain"] <= 1.0 and s["ppl_ratio"] > 0
    rows = [RunResult.from_dict(json.loads(x)) for x in save.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2
    assert all(r.text.startswith(f"[{r.voice}]") for r in rows)
    assert plot.read_text(encoding="utf-8").startswith("<svg")
