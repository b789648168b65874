"""Steering on the real embedded model through the owned llama.cpp decode loop."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from thoughtform.backends import create_backend
from thoughtform.backends import logits as L
from thoughtform.conversation import ChatSettings, build_request, steer_plan
from thoughtform.evaluate.adherence import default_prompts_path, form_check, read_prompts
from thoughtform.generate import Generation
from thoughtform.steer import SteerPlan
from thoughtform.trace import Trace
from thoughtform.voices import resolve_voice_set

pytestmark = pytest.mark.model

VS = resolve_voice_set("seed")
PROMPTS = [
    "Is the sea blue?",
    "Should I learn the violin at forty?",
    "What is a prime number?",
    "My friend did not call back.",
    "Describe a rainy afternoon.",
    "Why do cats purr?",
]


@pytest.fixture(scope="module")
def voices_model() -> Iterator[Any]:
    b = create_backend("llamacpp", model="embedded-voices")
    yield b
    b.close()


@pytest.fixture(scope="module")
def plain_model() -> Iterator[Any]:
    b = create_backend("llamacpp")
    yield b
    b.close()


def run(
    backend: Any,
    prompt: str,
    plan: SteerPlan | None = None,
    seed: int = 0,
    n: int = 48,
    model: str | None = "embedded-voices",
) -> Trace:
    st = ChatSettings(model=model, seed=seed, max_tokens=n, alternatives=3)
    return Generation(backend, build_request(st, VS, [("user", prompt)]), VS, steer=plan).run()


def voices_of(tr: Trace) -> list[str]:
    return [s.voice for s in tr.segments if s.text.strip()]


@pytest.mark.parametrize("voice", ["Doubt", "Pulse", "Shift"])
def test_next_voice_opens_the_reply_on_varied_prompts(voices_model: Any, voice: str) -> None:
    plan = steer_plan(VS, next_voice=voice)
    for i, p in enumerate(PROMPTS[:4]):
        tr = run(voices_model, p, plan, seed=i, n=16)
        assert voices_of(tr)[0] == voice, tr.text
        marker = [t for t in tr.tokens if t.forced]
        assert "".join(t.text for t in marker).strip() == f"[{voice}]"
        assert all(t.steered and t.steered_logprob == 0.0 for t in marker)
        first = tr.voice_choices[0]
        assert first["token"] == 0 and first["forced"] and first["chosen"] == voice


def test_mute_removes_a_voice_the_model_otherwise_uses(voices_model: Any) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(PROMPTS):
        for v in set(voices_of(run(voices_model, p, seed=i, n=64))):
            seen[v] = seen.get(v, 0) + 1
    target = max(seen, key=lambda v: seen[v])  # the voice the adapter uses most here
    assert seen[target] >= 2
    plan = steer_plan(VS, mute=[target])
    for i, p in enumerate(PROMPTS):
        tr = run(voices_model, p, plan, seed=i, n=64)
        assert target not in voices_of(tr), tr.text
        assert all(target not in c["probs"] or c["chosen"] != target for c in tr.voice_choices)


def test_a_voice_at_temperature_zero_repeats_across_seeds(voices_model: Any) -> None:
    plan = steer_plan(VS, next_voice="Doubt", voice_sampling=["Doubt=0"])
    traces = [run(voices_model, "Is the sea blue?", plan, seed=s, n=64) for s in (1, 2, 3)]
    firsts = {tr.segments[0].text for tr in traces if tr.segments}
    assert len(firsts) == 1 and traces[0].segments[0].voice == "Doubt"
    rests = {tr.text[len(tr.segments[0].text) + 10 :] for tr in traces}
    assert len(rests) > 1  # the voices after it still sample with their own temperature
    # Tokens sampled at temperature 0 for Doubt are marked as steered (T differs from 0.7).
    body = [t for t in traces[0].tokens if t.voice == "Doubt" and not t.forced]
    assert body and sum(t.steered for t in body) >= len(body) - 2


def test_who_speaks_next_matches_brute_force_scoring(voices_model: Any) -> None:
    tr = run(voices_model, "What is a prime number?", None, seed=3, n=24)
    first = tr.voice_choices[0]
    assert first["token"] == 0
    total = sum(first["probs"].values())
    assert 0.0 < total <= 1.0 + 1e-6
    # Brute force: for each voice, evaluate prompt + marker afresh in one batch, no sequence
    # copies, and add up the marker tokens' log-probabilities. (Token-by-token decoding goes
    # through other kernels and differs by up to ~10% on this Q4 model: not a scoring error.)
    b = voices_model
    st = ChatSettings(model="embedded-voices", seed=3, max_tokens=24)
    ids = b.prompt_ids(build_request(st, VS, [("user", "What is a prime number?")]))
    for v in VS.voices:
        marker = b.vocab().marker_ids(v.open_marker)
        b._c.llama_memory_clear(b._mem, True)
        b._past = []
        n0 = len(ids) - 1
        b._decode([(t, i, 0, i >= n0) for i, t in enumerate(ids + marker[:-1])])
        lp = 0.0
        for j, tok in enumerate(marker):
            x = np.array(b._logits(n0 + j), dtype=np.float64)
            lp += x[tok] - (x.max() + math.log(np.exp(x - x.max()).sum()))
        assert first["probs"][v.name] == pytest.approx(math.exp(lp), rel=1e-3, abs=1e-5), v.name
    b._c.llama_memory_clear(b._mem, True)
    # Every later boundary is a real one: its chosen voice opened right there.
    for c in tr.voice_choices[1:]:
        if c["chosen"]:
            assert tr.tokens[c["token"]].text.lstrip().startswith("[")


def test_trace_records_voice_choices_and_steering(voices_model: Any, tmp_path: Any) -> None:
    from thoughtform.trace import load_trace

    st = ChatSettings(model="embedded-voices", seed=5, max_tokens=24)
    plan = steer_plan(VS, next_voice="Echo")
    path = tmp_path / "t.jsonl"
    Generation(
        voices_model, build_request(st, VS, [("user", "hi")]), VS, steer=plan, trace_path=path
    ).run()
    tr = load_trace(path)
    assert tr.meta["steer"]["next_voice"] == "Echo"
    assert tr.voice_choices and tr.voice_choices[0]["chosen"] == "Echo"
    assert any(t.forced for t in tr.tokens)
    assert path.read_text().count('"type":"voice_choice"') == len(tr.voice_choices)


@pytest.mark.timeout(1800)  # 40 replies: ~2 min on an idle 2-core machine, far more when shared
def test_structure_makes_the_plain_model_well_formed(plain_model: Any) -> None:
    """`--structure` on the plain embedded model (no adapter) over the 40 eval prompts."""
    prompts = read_prompts(default_prompts_path())
    plan = steer_plan(VS, structure=True)
    ok = 0
    bad = []
    for i, p in enumerate(prompts):
        tr = run(plain_model, p, plan, seed=i, n=100, model=None)
        if form_check(tr.text, VS).ok:
            ok += 1
        else:
            bad.append(tr.text[:200])
    assert ok / len(prompts) >= 0.95, bad[:3]


def test_seeded_replies_repeat_with_steering(voices_model: Any) -> None:
    plan = steer_plan(VS, mute=["Echo"], voice_sampling=["Pulse=1.2"])
    a = run(voices_model, "Why do cats purr?", plan, seed=9, n=40)
    b = run(voices_model, "Why do cats purr?", plan, seed=9, n=40)
    assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
    assert a.voice_choices == b.voice_choices


def test_structure_as_gbnf_parses_in_llama_cpp_and_holds(plain_model: Any) -> None:
    from thoughtform.steer import Structure, structure_gbnf

    g = structure_gbnf(VS, Structure(min_blocks=2, max_blocks=3, first="Echo"), mute=["Doubt"])
    assert plain_model._grammar_ok(g)
    plan = steer_plan(VS, structure=True, order=["first=Echo", "max-blocks=3"], mute=["Doubt"])
    st = ChatSettings(model=None, seed=2, max_tokens=100, steer=plan, structure_by="grammar")
    for p in PROMPTS[:3]:
        req = build_request(st, VS, [("user", p)])
        assert req.grammar is not None
        tr = Generation(plain_model, req, VS, steer=st.conductor_plan).run()
        names = voices_of(tr)
        assert form_check(tr.text, VS).ok and names[0] == "Echo", tr.text
        assert "Doubt" not in names and len(names) <= 3
        assert all(a != b for a, b in itertools.pairwise(names))


def test_voice_vectors_switch_at_the_voice_boundary(voices_model: Any, tmp_path: Any) -> None:
    from thoughtform.vectors.cvec import ControlVector, write_control_vector

    rng = np.random.default_rng(0)
    n_embd = voices_model.n_embd
    for voice in ("Doubt", "Pulse"):
        dirs = {layer: rng.standard_normal(n_embd).astype(np.float32) for layer in range(8, 20)}
        write_control_vector(ControlVector(dirs, name=voice), tmp_path / f"{voice}.gguf")
    plan = SteerPlan(next_voice="Doubt", vectors={"Doubt": 4.0}, vector_dir=str(tmp_path))
    plain = SteerPlan(next_voice="Doubt")
    a = run(voices_model, "Is the sea blue?", plan.resolved(VS), seed=4, n=24)
    b = run(voices_model, "Is the sea blue?", plain.resolved(VS), seed=4, n=24)
    marker = [t for t in a.tokens if t.forced]
    assert marker and all(t.vector is None for t in marker)  # set from the marker's end on
    body = [t for t in a.tokens if not t.forced and t.voice == "Doubt"]
    assert body and all(t.vector == [["Doubt", 4.0]] for t in body)
    # Same prompt, seed and marker: the block's first token was sampled from logits computed
    # before the vector was set (the marker's own decode), so it is the same; the vector acts on
    # every token decoded after it and so on the distribution of the next one.
    first = len(marker)
    assert a.tokens[first].logprob == pytest.approx(b.tokens[first].logprob, abs=1e-6)
    assert a.tokens[first].token_id == b.tokens[first].token_id
    assert a.tokens[first + 1].logprob != pytest.approx(b.tokens[first + 1].logprob, abs=1e-3) or (
        a.tokens[first + 1].token_id != b.tokens[first + 1].token_id
    )
    # Cleared after the reply: the next unsteered run is the unsteered one again.
    c = run(voices_model, "Is the sea blue?", plain.resolved(VS), seed=4, n=24)
    assert [t.token_id for t in c.tokens] == [t.token_id for t in b.tokens]


def test_the_marker_written_after_scoring_is_not_decoded_twice(
    voices_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Who-speaks-next decodes every marker on its own sequence; the one the reply then writes
    shares those cache cells: fewer decodes, and its tokens' telemetry is the scoring's own."""
    b = voices_model
    singles: list[int] = []
    orig = b._decode_next

    def counting(tok: int, pos: int) -> None:
        singles.append(tok)
        orig(tok, pos)

    monkeypatch.setattr(b, "_decode_next", counting)
    tr = run(b, "Is the sea blue?", steer_plan(VS, next_voice="Doubt"), seed=1, n=24)
    marker = b.vocab().marker_ids("[Doubt]")
    ids = [t.token_id for t in tr.tokens]
    assert ids[: len(marker) - 1] == marker[:-1] and tr.text.startswith("[Doubt]")
    # Every emitted token but the last is in the cache; the marker's first three came from the
    # scoring batch ("[", "Dou", "bt"), not from a decode of their own.
    decoded = len(ids) - (1 if tr.finish and tr.finish["reason"] == "length" else 0)
    assert len(singles) == decoded - (len(marker) - 1)
    # The forced marker's telemetry is the scoring's: the product of its token probabilities is
    # the probability the choice recorded for Doubt.
    assert ids[: len(marker)] == marker  # "]" then "\n": the marker's own tokens
    p = math.exp(sum(t.logprob or 0.0 for t in tr.tokens[: len(marker)]))
    assert p == pytest.approx(tr.voice_choices[0]["probs"]["Doubt"], rel=1e-4)
    # Seeded replies still repeat token for token through the shared cells.
    again = run(b, "Is the sea blue?", steer_plan(VS, next_voice="Doubt"), seed=1, n=24)
    assert [t.token_id for t in again.tokens] == ids


def test_observed_boundaries_are_scored_beside_the_reply_and_change_nothing(
    voices_model: Any,
) -> None:
    """Who-speaks-next that only observes runs on the side context: the reply is token for token
    the one written without scoring, and the probabilities are the in-line scoring's."""
    b = voices_model
    assert b.side_scoring == (len(os.sched_getaffinity(0)) >= 2)  # a core beside the decode
    b.side_scoring = True  # on one core too: slower, the same replies
    prompt = "Should I change my job?"
    scored = run(b, prompt, SteerPlan(score_voices=True), seed=1, n=96)
    unscored = run(b, prompt, SteerPlan(score_voices=False), seed=1, n=96)
    assert [t.token_id for t in scored.tokens] == [t.token_id for t in unscored.tokens]
    boundaries = [
        i for i, t in enumerate(scored.tokens) if i and t.text.lstrip("\n").startswith("[")
    ]
    assert len(scored.voice_choices) >= 2 and boundaries
    assert [c["token"] for c in scored.voice_choices[1:]] == boundaries[
        : len(scored.voice_choices) - 1
    ]
    assert all(0.0 < sum(c["probs"].values()) <= 1.0 + 1e-6 for c in scored.voice_choices)
    assert all(c["probs"][c["chosen"]] > 0 for c in scored.voice_choices if c["chosen"])
    b.side_scoring = False
    try:
        inline = run(b, prompt, SteerPlan(score_voices=True), seed=1, n=8)
    finally:
        b.side_scoring = True
    first, ref = scored.voice_choices[0], inline.voice_choices[0]
    assert first["token"] == ref["token"] == 0
    for v, p in ref["probs"].items():
        assert first["probs"][v] == pytest.approx(p, rel=1e-5, abs=1e-9), v


def test_the_side_context_mirrors_the_reply_cache_and_its_vectors(
    voices_model: Any, tmp_path: Any
) -> None:
    """score_later against score_sequences on the same context: after the cache grew, after a
    follow-up reused only part of it, and under a voice vector (which changes the scores)."""
    from thoughtform.vectors.cvec import ControlVector, write_control_vector

    b = voices_model
    seqs = [b.vocab().marker_ids(v.open_marker) for v in VS.voices]

    def both() -> tuple[list[float], list[float]]:
        x = np.array(b._logits(-1), dtype=np.float32)
        lz = float(L.log_partition(x))
        fut = b.score_later(seqs, x, lz)
        assert fut is not None
        side = fut.result(timeout=60)
        return side, b.score_sequences(seqs, x, lz)

    def close(a: list[float], c: list[float]) -> None:
        # Log-probabilities: mid-text markers are unlikely (-15 to -35 nats here).
        assert np.allclose(a, c, rtol=0, atol=1e-3), (a, c)

    with b._lock:
        ids = b.tokenize("<|im_start|>user\nTell me about the tide.<|im_end|>\n")
        b._eval_prompt(ids, fresh=True)
        close(*both())
        for tok in b.tokenize("The tide comes in twice a day.\n"):
            b._advance(tok).result()  # the reply grows: the side takes only the new cells
        close(*both())
        # A follow-up that shares the first tokens: the side drops what the reply recomputed.
        b._eval_prompt(ids[:5] + b.tokenize(" and the moon.\n"), fresh=False)
        close(*both())
        dirs = {layer: np.full(b.n_embd, 0.05, dtype=np.float32) for layer in range(4, 24)}
        write_control_vector(ControlVector(dirs, name="Doubt"), tmp_path / "Doubt.gguf")
        plan = SteerPlan(vector_dir=str(tmp_path))

        b._set_vector((("Doubt", 8.0),), SimpleNamespace(plan=plan))
        try:
            b._advance(b.tokenize(" So")[0]).result()  # decoded under the vector
            side, inline = both()
            close(side, inline)
            b._set_vector((), None)
            b._eval_prompt(b._past[:-1] + b._past[-1:], fresh=True)  # the same, unsteered
            assert np.abs(np.array(both()[0]) - np.array(side)).max() > 1.0
        finally:
            b._set_vector((), None)
