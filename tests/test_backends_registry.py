"""Backend registry: built-ins by name, third-party plugins via the entry-point group."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from thoughtform.backends import (
    BackendError,
    GenerationRequest,
    Message,
    available_backends,
    create_backend,
)
from thoughtform.backends.replay import ReplayBackend
from thoughtform.generate import Generation

PLUGIN = """
from thoughtform.backends.replay import ReplayBackend


class EchoBackend(ReplayBackend):
    name = "echo-plugin"

    def __init__(self, text: str = "[Echo]\\nplugged in") -> None:
        super().__init__(text=text)
"""


@pytest.fixture()
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tf_echo_plugin.py").write_text(PLUGIN, encoding="utf-8")
    dist = tmp_path / "tf_echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tf-echo-plugin\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        "[thoughtform.backends]\necho-plugin = tf_echo_plugin:EchoBackend\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tf_echo_plugin", None)


def test_builtins_are_registered() -> None:
    assert {"llamacpp", "openai", "transformers", "replay"} <= set(available_backends())
    assert isinstance(create_backend("replay", text="hi"), ReplayBackend)


def test_third_party_backend_through_entry_point(plugin_on_path: Path) -> None:
    assert "echo-plugin" in available_backends()
    backend = create_backend("echo-plugin")
    trace = Generation(backend, GenerationRequest(messages=(Message("user", "x"),)), "seed").run()
    assert [(s.voice, s.text) for s in trace.segments] == [("Echo", "plugged in")]


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match=r"unknown backend 'nope' \(available: .*replay"):
        create_backend("nope")
