"""The council on the embedded model with the voices adapter (llama.cpp): who speaks next
from the model, turns cut by the conductor, continuation scores that match generation."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from thoughtform.backends.base import GenerationRequest, Message, Sampling
from thoughtform.council import Council, marker_leaks, surprisal_fn
from thoughtform.generate import Generation
from thoughtform.resonance import counterfactual_scores
from thoughtform.voices import PRESETS

pytest.importorskip("llama_cpp")

SEED = PRESETS["seed"]


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from thoughtform.backends import create_backend

    b = create_backend("llamacpp", model="embedded-voices", n_ctx=2048)
    yield b
    b.close()


def test_score_continuations_matches_the_generated_logprobs(backend: Any) -> None:
    req = GenerationRequest(
        messages=(Message("user", "Why is the sky blue?"),),
        sampling=Sampling(temperature=0.0, seed=0, max_tokens=10),
        alternatives=1,
    )
    trace = Generation(backend, req, "plain").run()
    ids = [t.token_id for t in trace.tokens]
    assert backend.tokenize(trace.text) == ids
    want = sum(t.logprob or 0.0 for t in trace.tokens)
    head_text = "".join(t.text for t in trace.tokens[:4])
    assert backend.tokenize(head_text) == ids[:4]
    got = backend.score_continuations(req, [trace.text, head_text])
    assert got[0] == pytest.approx(want, abs=0.05)
    assert got[1] == pytest.approx(sum(t.logprob or 0.0 for t in trace.tokens[:4]), abs=0.05)
    # A prefix moves the context: scoring the rest after it adds up to the whole.
    rest = trace.text[len(head_text) :]
    if backend.tokenize(rest) == ids[4:]:
        split = got[1] + backend.score_continuations(req, [rest], prefix=head_text)[0]
        assert split == pytest.approx(got[0], abs=0.05)


def test_model_policy_council_on_the_voices_adapter(backend: Any) -> None:
    c = Council(
        SEED,
        ["Echo", "Doubt", "Pulse", "Shift"],
        backend,
        "model",
        seed=0,
        sampling=Sampling(max_tokens=40, seed=0),
    )
    c.say("Why is the sky blue?")
    events = list(c.run(3))
    turns = c.turns[1:]
    assert len(turns) == 3
    for t in turns:
        assert t.by == "model" and math.isclose(sum(t.probs.values()), 1.0, abs_tol=1e-9)
        assert t.text and t.finish in ("stop", "length")
        assert f"[{t.voice}]" not in t.text and not marker_leaks(t.text, SEED, t.voice)
        # The conductor opened the speaker's marker: its tokens are forced, then the model's.
        toks = c.trace.tokens[t.start : t.end]
        assert toks[0].forced and any(not x.forced for x in toks)
        assert all(x.turn == t.index for x in toks)
    assert turns[1].voice != turns[0].voice  # the last speaker is barred
    assert [e.kind for e in events].count("end") == 3
    # Counterfactual resonance on the same model: finite surprisals, each computed once.
    f = surprisal_fn(SEED, c.members, c.turns, backend.score_continuations, backend.tokenize)
    cache: dict[tuple[int, frozenset[int]], float] = {}
    s = counterfactual_scores(c.turns, f, cache, pairs=[(3, 2), (3, 0)])
    assert set(s[3]) == {0, 2} and all(math.isfinite(v) for v in s[3].values())
    assert len(cache) == 3 and all(v > 0 for v in cache.values())


def test_counterfactual_in_the_council_tab_on_the_embedded_model(
    backend: Any, tmp_path: Any
) -> None:
    # Computed on demand through llama.cpp's score_continuations, once the run is over (while
    # a turn streams the backend's lock is held by that generation), then from the cache.
    from thoughtform.resonance import council_scores
    from thoughtform.ui.config import ServeConfig
    from thoughtform.ui.council_view import CouncilService
    from thoughtform.ui.service import Workbench

    svc = CouncilService(Workbench(ServeConfig(backend="llamacpp", db=str(tmp_path / "db"))))
    svc.wb.backend_for = lambda s: backend  # type: ignore[method-assign]  # the loaded model
    scored: list[int] = []
    real = backend.score_continuations

    def counting(*a: Any, **kw: Any) -> list[float]:
        scored.append(1)
        return list(real(*a, **kw))

    backend.score_continuations = counting
    try:
        got = [
            json.loads(p)
            for p, _ in svc.start(["Echo", "Doubt"], "list", 2, 12, "Is the sea cold?", None,
                                  "counterfactual")
        ]  # fmt: skip
    finally:
        del backend.score_continuations
    last = got[-1]
    assert last["state"] == "done" and last["shown"] == "counterfactual", last["measure_note"]
    assert all(g["arcs"] == [] for g in got[:-1])  # nothing scored mid-run
    live = svc.get(last["id"], None)
    assert [t.voice for t in live.council.turns] == [None, "Echo", "Doubt"]
    # Turn 1 without turn 0; turn 2 without 0 and without 1; each with everything: 5 scorings.
    assert len(scored) == 5 and len(live.cf_cache) == 5
    s = council_scores(live.council, "counterfactual", live.cf_cache)
    assert set(s) == {1, 2} and set(s[2]) == {0, 1}
    assert all(math.isfinite(v) for row in s.values() for v in row.values())
    assert all(math.isfinite(v) and v > 0 for v in live.cf_cache.values())  # nats/token
    counts = last["matrix"]["counts"]
    assert sum(map(sum, counts)) == 3
