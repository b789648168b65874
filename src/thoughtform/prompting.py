"""Voices by prompt: a system prompt that asks any instruct model to answer in a voice set."""

from __future__ import annotations

from .voices import VoiceSet


def voice_system_prompt(voices: VoiceSet, max_voices: int = 8) -> str:
    """A system prompt naming the voices, their characters, the marker format and an example.

    Returns "" for a set without voices (``plain``).
    """
    vs = sorted(voices.voices, key=lambda v: v.lane)[:max_voices]
    if not vs:
        return ""
    lines = ["You answer as several inner voices. Each voice speaks in its own manner:"]
    for v in vs:
        desc = v.description.strip() or f"{v.name} speaks in its own way."
        lines.append(f"- {v.name}: {desc}")
    bracket = [v for v in vs if v.syntax == "bracket"]
    tags = [v for v in vs if v.syntax == "tag"]
    if bracket:
        a = bracket[0]
        b = bracket[1] if len(bracket) > 1 else bracket[0]
        lines += [
            "",
            f"Start each voice on its own line with its name in square brackets, like [{a.name}].",
            "Use at least two different voices. Write nothing outside the voices.",
            "",
            "Example:",
            f"[{a.name}]",
            "A first thought, in this voice's manner.",
            "",
            f"[{b.name}]",
            "A second thought, in another voice's manner.",
        ]
    for t in tags:
        lines += [
            "",
            f"Put the {t.name} part between <{t.name}> and </{t.name}>, then write the answer.",
        ]
    return "\n".join(lines)
