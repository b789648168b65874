"""Loom on the transformers backend: the prefix fed again by id, the fork forced, N children one
after another (seeds seed+i), on the embedded SmolLM2 GGUF (offline)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.loom import Fork, branch
from thoughtform.trace import Trace
from thoughtform.voices import resolve_voice_set

pytestmark = pytest.mark.model

VS = resolve_voice_set("seed")


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from thoughtform.backends import create_backend

    b = create_backend("transformers")
    yield b
    b.close()


@pytest.fixture(scope="module")
def parent(backend: Any) -> Trace:
    from thoughtform.conversation import ChatSettings, build_request
    from thoughtform.generate import Generation

    st = ChatSettings(backend="transformers", seed=1, max_tokens=20, alternatives=5)
    return Generation(backend, build_request(st, VS, [("user", "Is the sea blue?")]), VS).run()


def test_branch_reproduces_the_prefix_forces_the_token_and_children_differ(
    backend: Any, parent: Trace
) -> None:
    assert backend.capabilities.branching and backend.capabilities.branch_prefix == "ids"
    at = 8
    alt = parent.tokens[at].top[1]
    assert alt.token_id is not None and alt.token_id != parent.tokens[at].token_id
    kids = branch(backend, parent, Fork(at, token_id=alt.token_id), n=2, seed=3, max_tokens=8)
    assert len(kids) == 2
    for k in kids:
        assert [t.token_id for t in k.tokens[:at]] == [t.token_id for t in parent.tokens[:at]]
        # Telemetry before the fork is the parent's, shared, not regenerated.
        assert [t.logprob for t in k.tokens[:at]] == [t.logprob for t in parent.tokens[:at]]
        fk = k.tokens[at]
        assert fk.forced and fk.token_id == alt.token_id
        # The forced token's telemetry is the model's own distribution at the fork.
        assert fk.logprob == pytest.approx(alt.logprob, abs=1e-3)
        assert len(fk.top) == len(parent.tokens[at].top)
        assert not any(t.forced for t in k.tokens[at + 1 :])
        assert len(k.tokens) > at + 1
        assert k.meta["branch"]["prefix"] == "ids" and k.meta["branch"]["exact_ids"]
    assert [k.meta["branch"]["seed"] for k in kids] == [3, 4]
    assert kids[0].text != kids[1].text
    # A child is its seed's: branching again with seed 3 gives the same continuation.
    again = branch(backend, parent, Fork(at, token_id=alt.token_id), seed=3, max_tokens=8)[0]
    assert [t.token_id for t in again.tokens] == [t.token_id for t in kids[0].tokens]


def test_a_voice_opens_at_the_fork(backend: Any, parent: Trace) -> None:
    at = 6
    kid = branch(backend, parent, Fork(at, voice="Doubt"), max_tokens=10)[0]
    assert [t.token_id for t in kid.tokens[:at]] == [t.token_id for t in parent.tokens[:at]]
    forced = [t for t in kid.tokens[at:] if t.forced]
    assert "[Doubt]" in "".join(t.text for t in forced)
    assert "Doubt" in [s.voice for s in kid.segments if s.text.strip()]


def test_cli_branch_on_transformers(parent: Trace, tmp_path: Path) -> None:
    from thoughtform.cli import main
    from thoughtform.trace import load_trace

    src = tmp_path / "parent.jsonl"
    parent.save(src)
    at = 5
    alt = parent.tokens[at].top[1].token_id
    out = tmp_path / "kid.jsonl"
    args = ["branch", str(src), "--at", str(at), "--token-id", str(alt), "--seed", "1"]
    args += ["--max-tokens", "4", "--backend", "transformers", "--out", str(out)]
    assert main(args) == 0
    k = load_trace(out)
    assert [t.token_id for t in k.tokens[:at]] == [t.token_id for t in parent.tokens[:at]]
    assert k.tokens[at].token_id == alt and k.tokens[at].forced
    assert k.meta["branch"]["prefix"] == "ids"
