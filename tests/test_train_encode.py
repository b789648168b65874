"""Chat encoding for training: loss exactly on assistant content + end-of-turn; batching helpers."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

pytest.importorskip("transformers")

from thoughtform.train.encode import IGNORE, encode_chat
from thoughtform.train.lora import collate, epoch_batches, lr_factor

CONVO = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "[Echo]\nHi there, you say.\n\n[Doubt]\nDo you?"},
    {"role": "user", "content": "Yes."},
    {"role": "assistant", "content": "[Pulse]\nA breath."},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    from thoughtform.backends.transformers import load_model

    return load_model(None).tokenizer


def _trained_runs(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    runs: list[str] = []
    cur: list[int] = []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == i  # a trained position predicts its own token
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_mask_is_exactly_replies_and_end_of_turn(tok: Any) -> None:
    e = encode_chat(tok, CONVO)
    full = tok.apply_chat_template(CONVO, tokenize=False)
    # Part-wise tokenization gives the same ids as the whole templated text here.
    assert e.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert _trained_runs(tok, e.input_ids, e.labels) == [
        "[Echo]\nHi there, you say.\n\n[Doubt]\nDo you?<|im_end|>",
        "[Pulse]\nA breath.<|im_end|>",
    ]
    # Everything before the first reply is masked, and it ends with the assistant header.
    first = next(i for i, lab in enumerate(e.labels) if lab != IGNORE)
    assert tok.decode(e.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert all(lab == IGNORE for lab in e.labels[:first])
    # The newline the template puts after <|im_end|> is never trained.
    assert e.labels[-1] == IGNORE and tok.decode(e.input_ids[-1:]) == "\n"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for lab in e.labels if lab == end) == 2
    assert e.trained == sum(1 for lab in e.labels if lab != IGNORE)


def test_system_message_is_never_trained(tok: Any) -> None:
    convo = [{"role": "system", "content": "Speak in voices."}, *CONVO[:2]]
    e = encode_chat(tok, convo)
    text = tok.decode(e.input_ids)
    assert "Speak in voices." in text and "SmolLM" not in text  # no default system prompt
    assert _trained_runs(tok, e.input_ids, e.labels) == [
        "[Echo]\nHi there, you say.\n\n[Doubt]\nDo you?<|im_end|>"
    ]


def test_truncation_and_no_reply(tok: Any) -> None:
    full = encode_chat(tok, CONVO)
    cut = encode_chat(tok, CONVO, max_len=40)
    assert cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]
    short = encode_chat(tok, CONVO, max_len=20)  # only the system prompt fits
    assert short.trained == 0
    assert encode_chat(tok, CONVO[:1]).trained == 0


def test_epoch_batches_cover_each_example_once() -> None:
    lengths = [(i * 37) % 101 for i in range(50)]
    b0 = epoch_batches(lengths, 4, seed=3, epoch=0)
    flat = [i for b in b0 for i in b]
    assert sorted(flat) == list(range(50))
    assert all(1 <= len(b) <= 4 for b in b0) and len(b0) == 13
    assert b0 == epoch_batches(lengths, 4, seed=3, epoch=0)  # pure function
    assert b0 != epoch_batches(lengths, 4, seed=3, epoch=1)
    assert b0 != epoch_batches(lengths, 4, seed=4, epoch=0)
    # Within each window examples are length-sorted, so batches hold similar lengths.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in b0) / len(b0)
    assert spread < 30


def test_lr_schedule() -> None:
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert f[20] == pytest.approx(0.1)


def test_collate_pads_right() -> None:
    from thoughtform.train.encode import Encoded

    b = collate([Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8])], pad_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
