"""Loom: branches reproduce their prefix exactly, force the fork, and compare voice by voice."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.cli import main
from thoughtform.loom import Fork, LoomError, compare, fork_index, reconvergence
from thoughtform.parse import parse_text
from thoughtform.trace import Alternative, TokenRecord, Trace, load_trace
from thoughtform.voices import resolve_voice_set

VS = resolve_voice_set("seed")


def hand_trace(
    pieces: list[tuple[str, int, float]], alts: dict[int, list[Alternative]] | None = None
) -> Trace:
    """A trace from (text, token_id, logprob) pieces, voices parsed from the text."""
    toks = []
    for i, (text, tid, lp) in enumerate(pieces):
        toks.append(
            TokenRecord(
                index=i,
                text=text,
                token_id=tid,
                logprob=lp,
                top=(alts or {}).get(i, []),
                entropy=1.0,
            )
        )
    t = Trace(meta={"voices": "seed"}, tokens=toks)
    t.segments = parse_text(t.text, VS)
    from thoughtform.generate import revoice

    for tok, v in zip(t.tokens, revoice(t.tokens, VS), strict=True):
        tok.voice = v
    return t


PARENT = [
    ("[Echo]\n", 1, -0.1),
    ("The sea", 2, -1.0),
    (" is blue", 3, -1.0),
    (".\n\n", 4, -0.5),
    ("[Doubt]\n", 5, -0.2),
    ("Is it really", 6, -2.0),
    (" blue", 7, -1.0),
    ("?", 8, -0.3),
]


def test_compare_finds_the_fork_voices_and_reconvergence() -> None:
    alts = {4: [Alternative("[Pulse]\n", math.log(0.2), 9), Alternative("[Doubt]\n", -0.2, 5)]}
    a = hand_trace(PARENT, alts)
    b = hand_trace(
        [
            *PARENT[:4],
            ("[Pulse]\n", 9, -1.6),
            ("A beat", 10, -2.0),
            (" is it really blue", 11, -1.0),
        ]
    )
    assert fork_index(a, b) == 4
    res = compare(a, b)
    assert res["fork"] == 4
    assert res["a"]["voices"] == ["Doubt"] and res["b"]["voices"] == ["Pulse"]
    assert res["appeared"] == ["Pulse"] and res["vanished"] == ["Doubt"]
    assert res["b"]["forked_token_p_under_a"] == pytest.approx(0.2)
    assert res["b"]["stats"]["Pulse"]["tokens"] == 3
    rc = res["reconverge"]
    assert rc is not None and rc["words"] == "is it really blue"
    assert (
        reconvergence(a, hand_trace([*PARENT[:4], ("[Pulse]\n", 9, -1.0), ("x", 12, -1)]), 4)
        is None
    )


def test_fork_validates_what_it_forces() -> None:
    with pytest.raises(LoomError):
        Fork(3)
    with pytest.raises(LoomError):
        Fork(3, token_id=1, voice="Echo")
    with pytest.raises(LoomError):
        Fork(-1, text="x")
    f = Fork(7, voice="Doubt")
    assert Fork.from_dict(f.to_dict()) == f and f.describe() == "@7 voice Doubt"


# ------------------------------------------------------------------- on the embedded model


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from thoughtform.backends import create_backend

    b = create_backend("llamacpp", model="embedded-voices")
    yield b
    b.close()


@pytest.fixture(scope="module")
def parent(backend: Any) -> Trace:
    from thoughtform.conversation import ChatSettings, build_request
    from thoughtform.generate import Generation

    st = ChatSettings(seed=1, max_tokens=48, alternatives=5)
    return Generation(backend, build_request(st, VS, [("user", "Is the sea blue?")]), VS).run()


@pytest.mark.model
def test_branch_keeps_the_prefix_and_forces_the_alternative(backend: Any, parent: Trace) -> None:
    from thoughtform.loom import branch

    at = 12
    alt = parent.tokens[at].top[1]
    kid = branch(backend, parent, Fork(at, token_id=alt.token_id), max_tokens=16)[0]
    assert [t.token_id for t in kid.tokens[:at]] == [t.token_id for t in parent.tokens[:at]]
    # Telemetry before the fork is the parent's, not regenerated.
    assert [t.logprob for t in kid.tokens[:at]] == [t.logprob for t in parent.tokens[:at]]
    assert kid.tokens[at].token_id == alt.token_id and kid.tokens[at].forced
    assert kid.tokens[at].logprob == pytest.approx(alt.logprob, abs=1e-4)
    assert len(kid.tokens) > at + 1
    assert kid.meta["branch"]["fork"]["at"] == at
    assert kid.meta["branch"]["parent_logprob"] == pytest.approx(alt.logprob)


@pytest.mark.model
def test_n_children_in_one_batch_differ_by_seed(backend: Any, parent: Trace) -> None:
    from thoughtform.loom import branch

    at = 20
    kids = branch(backend, parent, Fork(at, text=" and"), n=4, seed=3, max_tokens=16)
    assert len(kids) == 4
    for k in kids:
        assert [t.token_id for t in k.tokens[:at]] == [t.token_id for t in parent.tokens[:at]]
        assert k.tokens[at].forced and k.tokens[at].text == " and"
    assert len({k.text for k in kids}) >= 3
    assert [k.meta["branch"]["seed"] for k in kids] == [3, 4, 5, 6]
    # One child from the batch equals the same child sampled alone (same seed, same prefix).
    alone = branch(backend, parent, Fork(at, text=" and"), n=1, seed=3, max_tokens=16)[0]
    same = sum(
        a == b
        for a, b in zip(
            [t.token_id for t in alone.tokens], [t.token_id for t in kids[0].tokens], strict=False
        )
    )
    assert same >= at + 4  # batched kernels may flip a late sample, never the prefix


@pytest.mark.model
def test_another_voice_opens_at_a_boundary(backend: Any, parent: Trace) -> None:
    from thoughtform.loom import branch

    kid = branch(backend, parent, Fork(8, voice="Shift"), max_tokens=20)[0]
    voices = [s.voice for s in kid.segments if s.text.strip()]
    assert "Shift" in voices
    assert all(t.forced for t in kid.tokens[8 : 8 + 3])
    with pytest.raises(LoomError, match="unknown voice"):
        branch(backend, parent, Fork(8, voice="Nobody"))
    with pytest.raises(LoomError, match="past the reply"):
        branch(backend, parent, Fork(10_000, text="x"))


@pytest.mark.model
def test_cli_branch_and_compare(
    backend: Any, parent: Trace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "parent.jsonl"
    parent.save(p)
    alt = parent.tokens[5].top[1].token_id
    out = tmp_path / "kids"
    code = main(
        [
            "branch",
            str(p),
            "--at",
            "5",
            "--token-id",
            str(alt),
            "--n",
            "2",
            "--seed",
            "1",
            "--max-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    kids = sorted(out.glob("branch-*.jsonl"))
    assert len(kids) == 2
    k = load_trace(kids[0])
    assert k.tokens[5].token_id == alt
    capsys.readouterr()
    assert main(["compare", str(p), str(kids[0]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fork"] == 5
    assert main(["compare", str(p), str(kids[0])]) == 0
    assert "fork at token 5" in capsys.readouterr().out
    code = main(
        ["branch", str(p), "--at", "5", "--voice", "Nobody", "--out", str(tmp_path / "x.jsonl")]
    )
    assert code == 2
