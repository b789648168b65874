"""Steering on the transformers backend: the same conductor, its own masking and scoring."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from thoughtform.conversation import ChatSettings, build_request, steer_plan
from thoughtform.generate import Generation
from thoughtform.voices import resolve_voice_set

pytestmark = pytest.mark.model

VS = resolve_voice_set("seed")


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from thoughtform.backends import create_backend

    b = create_backend("transformers", model="embedded-voices")
    yield b
    b.close()


def run(backend: Any, prompt: str, plan: Any, seed: int, n: int = 24) -> Any:
    st = ChatSettings(backend="transformers", model="embedded-voices", seed=seed, max_tokens=n)
    return Generation(backend, build_request(st, VS, [("user", prompt)]), VS, steer=plan).run()


def test_next_voice_mute_and_who_speaks_next(backend: Any) -> None:
    import torch

    plan = steer_plan(VS, next_voice="Shift", mute=["Pulse"])
    tr = run(backend, "Is the sea blue?", plan, seed=2, n=40)
    voices = [s.voice for s in tr.segments if s.text.strip()]
    assert voices[0] == "Shift" and "Pulse" not in voices, tr.text
    assert any(t.forced for t in tr.tokens) and tr.tokens[0].forced
    first = tr.voice_choices[0]
    assert first["chosen"] == "Shift" and first["forced"]
    assert 0 < sum(first["probs"].values()) <= 1 + 1e-6
    # Brute force: the model over prompt + marker in one pass, for two voices.
    st = ChatSettings(backend="transformers", model="embedded-voices", seed=2)
    ids = backend.encode_prompt(build_request(st, VS, [("user", "Is the sea blue?")]))
    for name in ("Echo", "Doubt"):
        marker = backend.vocab().marker_ids(VS.get(name).open_marker)  # type: ignore[union-attr]
        with torch.inference_mode():
            out = backend.model(input_ids=torch.tensor([ids + marker[:-1]]))
        logp = torch.log_softmax(out.logits[0].float(), -1)
        lp = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(marker))
        assert first["probs"][name] == pytest.approx(math.exp(lp), rel=2e-3), name


def test_per_voice_temperature_zero_repeats(backend: Any) -> None:
    plan = steer_plan(VS, next_voice="Doubt", voice_sampling=["Doubt=0"])
    a = run(backend, "Why do cats purr?", plan, seed=1, n=20)
    b = run(backend, "Why do cats purr?", plan, seed=2, n=20)
    assert a.segments[0].voice == "Doubt"
    assert a.segments[0].text == b.segments[0].text
    # The telemetry is the model's own distribution, not the steered one.
    body = [t for t in a.tokens if not t.forced]
    assert body and all(t.steered for t in body[:3])
    assert all(t.logprob is not None and t.logprob <= 0 for t in body)
