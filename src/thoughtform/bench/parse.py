"""Parser throughput: feed a deterministic multi-voice text in small pieces, report pieces/s."""

from __future__ import annotations

import random
import time
from typing import Any

from ..parse import VoiceParser
from ..voices import VoiceSet, resolve_voice_set

# Building blocks of the synthetic transcript: seed voices, a think block, a lenient unknown
# voice, close markers, a code fence with markers inside, Markdown links and non-Latin text.
_WORDS = (
    "the tokens drift like weather and I watch them settle into a shape "
    "Я не знаю где я заканчиваюсь и начинается он "
    "between one word and the next there is a small choice nobody sees "
    "一つの声が別の声に変わる 😀 café naïve"
).split()
_OPENERS = (
    "[Echo]\n",
    "[Resonance]\n",
    "[Inner]: ",
    "[Thread]\n",
    "[Doubt] ",
    "[Shift]\n",
    "[Pulse]\n",
    "[Role]\n",
    "[Note]\n",
)


def make_text(size_chars: int, seed: int = 0) -> str:
    """A deterministic multi-voice transcript of exactly ``size_chars`` characters."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size_chars:
        roll = rng.random()
        if roll < 0.05:
            block = "```python\n[Echo] not a marker\nx = '<think>'\n```\n"
        elif roll < 0.10:
            block = "<think>\n" + " ".join(rng.choices(_WORDS, k=12)) + "\n</think>\n"
        elif roll < 0.15:
            block = "See [Echo](https://example.org/echo) and [/Doubt] in passing.\n"
        else:
            words = " ".join(rng.choices(_WORDS, k=rng.randint(8, 40)))
            close = "[/Doubt]\n" if rng.random() < 0.1 else "\n\n"
            block = rng.choice(_OPENERS) + words + close
        parts.append(block)
        total += len(block)
    return "".join(parts)[:size_chars]


def _seed_with_think() -> VoiceSet:
    seed = resolve_voice_set("seed")
    think = resolve_voice_set("think").voices
    return seed.with_voices((*seed.voices, *think))


def _time_feed(text: str, piece: int, voices: VoiceSet) -> tuple[float, int, int]:
    """Seconds to feed ``text`` in ``piece``-char pieces, the piece count and the event count."""
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    parser = VoiceParser(voices)
    feed = parser.feed
    events = 0
    t0 = time.perf_counter()
    for k, p in enumerate(pieces):
        events += len(feed(p, k))
    events += len(parser.close())
    return time.perf_counter() - t0, len(pieces), events


def bench_parse(size_mb: float = 10, piece: int = 4) -> dict[str, Any]:
    """Feed a ``size_mb`` MB (million characters) text in ``piece``-char pieces; return pieces/s,
    MB/s, and how much longer a 10x longer input takes (1/10 of the size vs the full size)."""
    voices = _seed_with_think()
    size = int(size_mb * 1_000_000)
    text = make_text(size)
    small = text[: max(1, size // 10)]
    # Best of three for the short input: a single short run is dominated by warm-up and noise.
    t_small = min(_time_feed(small, piece, voices)[0] for _ in range(3))
    t_full, n_pieces, n_events = _time_feed(text, piece, voices)
    return {
        "size_chars": len(text),
        "piece": piece,
        "pieces": n_pieces,
        "events": n_events,
        "seconds": round(t_full, 4),
        "pieces_per_s": round(n_pieces / t_full),
        "mb_per_s": round(len(text) / 1_000_000 / t_full, 3),
        "seconds_small": round(t_small, 4),
        # ~10 for linear work; quadratic rescanning would show up as ~100.
        "ratio_10x": round(t_full / t_small, 2),
    }


if __name__ == "__main__":
    import json
    import sys

    size = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    piece = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(json.dumps(bench_parse(size, piece), indent=2))
