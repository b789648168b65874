"""Chat examples to token ids and labels: loss on assistant replies and their end-of-turn only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # the label value torch's cross-entropy skips


class EncodeError(ValueError):
    """The tokenizer's chat template cannot be split into prompt and reply parts."""


@dataclass(frozen=True)
class Encoded:
    """One example: ``input_ids`` and ``labels`` (``IGNORE`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        """How many tokens carry a loss."""
        return sum(1 for x in self.labels if x != IGNORE)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], gen: bool) -> str:
    return str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already holds every special token: never let the tokenizer add a BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn (eos plus any special token in the template tail)."""
    out = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    return out


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_len: int | None = None
) -> Encoded:
    """Token ids of the chat-templated conversation with labels on assistant content + end-of-turn.

    Each part is tokenized on its own (prompt up to the assistant header, the reply, the tail),
    so the reply starts on a token boundary exactly as it does when a model generates it.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | end_of_turn_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # template text already turned into tokens
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], gen=True)
        full = _render(tokenizer, messages[: i + 1], gen=False)
        content = m["content"]
        if not head.startswith(done) or not full.startswith(head + content):
            raise EncodeError(
                "the chat template does not render the conversation as prefix + reply + tail"
            )
        prompt = _ids(tokenizer, head[len(done) :])
        reply = _ids(tokenizer, content)
        tail = _ids(tokenizer, full[len(head) + len(content) :])
        # Train the tail up to and including its first special token (the end-of-turn); what
        # follows it (a newline) is template glue the model never has to produce.
        cut = next((k + 1 for k, t in enumerate(tail) if t in special), 0)
        ids += prompt + reply + tail
        labels += [IGNORE] * len(prompt) + reply + tail[:cut] + [IGNORE] * (len(tail) - cut)
        done = full
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels)
