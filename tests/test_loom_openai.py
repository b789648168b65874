"""Loom on an OpenAI-compatible server: a REAL ``llama_cpp.server`` on the embedded SmolLM2.

The server takes no token ids, so a branch re-sends the parent's text up to the fork plus the
forced text; llama-cpp-python has no assistant prefill, so the chat is rendered with the
model's own template (read from the GGUF) and continued on the completions endpoint."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from thoughtform.backends.openai import OpenAIBackend
from thoughtform.cli import main
from thoughtform.loom import Fork, LoomError, branch
from thoughtform.trace import TokenRecord, Trace, load_trace
from thoughtform.voices import resolve_voice_set

pytestmark = pytest.mark.model
# The session fixture ``llama_server`` (a real llama_cpp.server) lives in tests/llama_server.py.
pytest_plugins = ["llama_server"]

VS = resolve_voice_set("seed")


def telemetry(t: TokenRecord) -> tuple[object, ...]:
    """What a token record says about the model (not when it arrived)."""
    return (t.text, t.token_id, t.logprob, [dataclasses.astuple(a) for a in t.top], t.entropy)


@pytest.fixture(scope="module")
def backend(llama_server: str) -> Iterator[OpenAIBackend]:
    from llama_server import embedded_gguf

    b = OpenAIBackend(base_url=llama_server, chat_template=str(embedded_gguf()))
    yield b
    b.close()


@pytest.fixture(scope="module")
def parent(backend: OpenAIBackend) -> Trace:
    from thoughtform.conversation import ChatSettings, build_request
    from thoughtform.generate import Generation

    st = ChatSettings(backend="openai", seed=1, max_tokens=20, alternatives=5)
    p = Generation(backend, build_request(st, VS, [("user", "Is the sea blue?")]), VS).run()
    assert len(p.tokens) >= 12, p.finish
    return p


def test_a_text_fork_continues_from_the_parents_text(backend: OpenAIBackend, parent: Trace) -> None:
    assert backend.capabilities.branching and backend.capabilities.branch_prefix == "text"
    at = 6
    kids = branch(backend, parent, Fork(at, text=" and"), n=2, seed=3, max_tokens=10)
    head = "".join(t.text for t in parent.tokens[:at]) + " and"
    for k in kids:
        assert k.text.startswith(head) and len(k.text) > len(head)
        # Telemetry before the fork is the parent's records, shared, not regenerated.
        assert [telemetry(t) for t in k.tokens[:at]] == [telemetry(t) for t in parent.tokens[:at]]
        fk = k.tokens[at]
        assert fk.forced and fk.text == " and"
        # The server gives nothing for text it did not sample; the parent's distribution at
        # the fork (the same context) is filled in.
        assert [a.text for a in fk.top] == [a.text for a in parent.tokens[at].top]
        assert not any(t.forced for t in k.tokens[at + 1 :])
        assert k.meta["branch"]["prefix"] == "text" and k.meta["branch"]["exact_ids"] is False
    assert [k.meta["branch"]["seed"] for k in kids] == [3, 4]  # one after another
    assert kids[0].text != kids[1].text


def test_a_token_fork_forces_the_alternatives_piece(backend: OpenAIBackend, parent: Trace) -> None:
    # The server reports no token ids; a parent recorded by an ids backend has them. Give the
    # alternatives at the fork ids, as such a parent would carry.
    at = 5
    p = Trace(meta=dict(parent.meta), tokens=[dataclasses.replace(t) for t in parent.tokens])
    rec = p.tokens[at]
    rec.top = [dataclasses.replace(a, token_id=100 + i) for i, a in enumerate(rec.top)]
    alt = next(a for a in rec.top if a.text != rec.text)
    kid = branch(backend, p, Fork(at, token_id=alt.token_id), seed=5, max_tokens=8)[0]
    assert kid.text.startswith("".join(t.text for t in p.tokens[:at]) + alt.text)
    fk = kid.tokens[at]
    assert fk.forced and fk.text == alt.text and fk.token_id == alt.token_id
    assert fk.logprob == pytest.approx(alt.logprob)
    assert kid.meta["branch"]["parent_logprob"] == pytest.approx(alt.logprob)
    with pytest.raises(LoomError, match="not recorded"):
        branch(backend, p, Fork(at, token_id=99_999))


def test_a_voice_fork_opens_that_voice(backend: OpenAIBackend, parent: Trace) -> None:
    at = 6
    kid = branch(backend, parent, Fork(at, voice="Doubt"), seed=2, max_tokens=10)[0]
    before = "".join(t.text for t in parent.tokens[:at])
    assert kid.text.startswith(before + "\n\n[Doubt]\n")
    assert kid.tokens[at].forced and "[Doubt]" in kid.tokens[at].text
    assert "Doubt" in [s.voice for s in kid.segments if s.text.strip()]


def test_a_chat_cannot_continue_without_prefill_or_template(
    llama_server: str, parent: Trace
) -> None:
    b = OpenAIBackend(base_url=llama_server)
    try:
        with pytest.raises(LoomError, match="chat template"):
            branch(b, parent, Fork(6, text=" and"), max_tokens=4)
    finally:
        b.close()


def test_cli_branch_on_the_openai_backend(
    llama_server: str, parent: Trace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llama_server import embedded_gguf

    src = tmp_path / "parent.jsonl"
    parent.save(src)
    out = tmp_path / "kid.jsonl"
    args = ["branch", str(src), "--at", "6", "--token", " and", "--max-tokens", "6"]
    args += ["--backend", "openai", "--base-url", llama_server, "--seed", "1"]
    code = main([*args, "--chat-template", str(embedded_gguf()), "--out", str(out)])
    assert code == 0
    kid = load_trace(out)
    assert kid.text.startswith("".join(t.text for t in parent.tokens[:6]) + " and")
    assert kid.meta["branch"]["prefix"] == "text"
    capsys.readouterr()
    assert main(["compare", str(src), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fork"] == 6
    code = main([*args, "--chat-template", str(tmp_path / "none.jinja"), "--out", str(out)])
    assert code == 2


def test_a_raw_prompt_branch_re_sends_the_text_exactly(backend: OpenAIBackend) -> None:
    from thoughtform.backends.base import FinishEvent, GenerationRequest, Sampling, TokenEvent

    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=8, seed=1)
    prompt, before, forced = "The lighthouse keeper", " climbed the stairs", " and"
    req = GenerationRequest(
        prompt=prompt, sampling=greedy, prefix_text=before, forced_text=forced, alternatives=2
    )
    evs = list(backend.stream(req))
    assert isinstance(evs[-1], FinishEvent) and evs[-1].reason in ("stop", "length")
    toks = [e for e in evs if isinstance(e, TokenEvent)]
    assert toks[0].forced and toks[0].text == forced
    assert not any(t.forced for t in toks[1:]) and len(toks) == 8  # the forced one counts
    # The continuation is the server's own greedy completion of prompt + prefix + forced.
    plain = GenerationRequest(
        prompt=prompt + before + forced, sampling=dataclasses.replace(greedy, max_tokens=7)
    )
    ref = [e.text for e in backend.stream(plain) if isinstance(e, TokenEvent)]
    assert "".join(t.text for t in toks[1:]) == "".join(ref)
