"""Every subcommand's --help says what each option does and its default; empty prompts fail."""

from __future__ import annotations

import argparse

import pytest

from thoughtform.cli import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_says_what_it_does_and_its_default() -> None:
    missing = []
    for name, p in _subparsers().items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.nargs == argparse.REMAINDER:
                continue
            h = (a.help or "").strip()
            words = h.replace("(default: none)", "").replace("(default: off)", "").strip()
            if not words or (not a.required and "default" not in h.lower()):
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}: {h!r}")
    assert not missing, "\n".join(missing)


def test_model_help_names_both_embedded_models() -> None:
    for name in ("generate", "chat"):
        h = next(a.help for a in _subparsers()[name]._actions if "--model" in a.option_strings)
        assert "embedded-voices" in (h or "") and "embedded |" in (h or "")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_is_a_usage_error(prompt: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--prompt", prompt])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--prompt is empty" in err[0]


def test_steering_mistakes_are_one_line_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in [
        (["generate", "--prompt", "hi", "--mute", "Nobody"], "unknown voice 'Nobody'"),
        (["generate", "--prompt", "hi", "--voice-sampling", "Doubt"], "NAME=TEMPERATURE"),
        (["generate", "--prompt", "hi", "--order", "first=Echo"], "--order needs --structure"),
        (["generate", "--prompt", "hi", "--next-voice", "Echo", "--mute", "Echo"], "is muted"),
    ]:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (argv, err)
