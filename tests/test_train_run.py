"""A tiny real LoRA run: loss goes down, checkpoints are complete, resume equals no interruption."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from thoughtform.train.cli import cli_train  # noqa: E402
from thoughtform.train.lora import TrainConfig, Trainer, TrainError  # noqa: E402

pytestmark = pytest.mark.model

DATA = Path(__file__).parent / "fixtures" / "train" / "tiny.jsonl"


def _cfg(out: Path) -> TrainConfig:
    # 12 examples, batch 3: 4 steps per epoch, so 6 steps cross into a second epoch. Dropout
    # draws from torch's RNG, so an exact resume also proves the RNG state is restored.
    return TrainConfig(
        data=[str(DATA)],
        out=str(out),
        steps=6,
        batch=3,
        max_len=64,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        lr=3e-3,
        warmup=1,
        save_every=2,
        keep_checkpoints=2,
        seed=7,
        threads=2,
        export=False,
    )


def _weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("straight")
    return out, Trainer(_cfg(out), progress=False).run()


def test_run_learns_and_reports(straight: tuple[Path, Any]) -> None:
    out, res = straight
    report = json.loads((out / "training.json").read_text())
    assert res.steps == 6 and report["steps"] == 6 and len(report["loss"]) == 6
    assert report["examples"] == 12 and report["dropped_no_reply_tokens"] == 0
    assert report["epochs"] == 1.5 and report["steps_per_epoch"] == 4
    # The same fixed sample of training examples has a lower loss after training.
    assert report["loss_after"] < report["loss_before"] - 0.2
    assert report["config"]["lora_r"] == 4 and report["device"] == "cpu"
    assert report["trainable_parameters"] == 30 * 4 * (
        (576 + 576) + (576 + 192) * 2 + (576 + 576) + (576 + 1536) * 3
    )
    assert report["train_seconds"] > 0 and report["tokens_per_s"] > 0
    # Checkpoints every 2 steps, the last 2 kept, each complete.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]
    for n in names:
        assert {p.name for p in (out / "checkpoints" / n).iterdir()} == {
            "adapter.safetensors",
            "state.pt",
            "done.json",
        }
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_resume_equals_uninterrupted(straight: tuple[Path, Any], tmp_path: Path) -> None:
    out, res = straight
    cfg = _cfg(tmp_path / "run")

    class Interrupted(Trainer):
        def _train_step(self) -> float:
            if self.step == 2:
                raise KeyboardInterrupt  # as if Ctrl-C arrived during step 3
            return super()._train_step()

    with pytest.raises(KeyboardInterrupt):
        Interrupted(cfg, progress=False).run()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]
    with pytest.raises(TrainError, match="--resume"):
        Trainer(cfg, progress=False)  # refuses to overwrite checkpoints silently
    resumed = Trainer(cfg, resume=True, progress=False).run()
    assert resumed.resumed_from == 2
    assert resumed.losses == pytest.approx(res.losses, abs=1e-5)
    a, b = _weights(out), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and len(a) == 30 * 7 * 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)


def test_resume_refuses_other_settings(straight: tuple[Path, Any], tmp_path: Path) -> None:
    out, _ = straight
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(TrainError, match=r"different settings \(lr\)"):
        Trainer(replace(_cfg(copy), lr=1e-3), resume=True, progress=False).run()
    with pytest.raises(TrainError, match="no checkpoint"):
        Trainer(_cfg(tmp_path / "empty"), resume=True, progress=False).run()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "oops"], "invalid float value"),
        (["--targets", " , "], "--targets is empty"),
    ],
)
def test_cli_user_mistakes(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        rc = cli_train([str(DATA), "--out", str(tmp_path / "o"), *extra])
    except SystemExit as e:
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_cli_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_train([str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
