"""Dataset validation, formats, convert round-trip, stats and the dataset CLI."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest

from thoughtform.data import formats as F
from thoughtform.data.cli import cli_dataset
from thoughtform.data.convert import convert
from thoughtform.data.stats import approx_tokens, dataset_stats, print_stats
from thoughtform.data.validate import iter_entries, json_depth, validate
from thoughtform.parse import parse_text
from thoughtform.voices import load_voice_set, resolve_voice_set

FIX = Path(__file__).parent / "fixtures" / "data"
BAD_ARGS = ["--voices", "voices.yaml", "--strict", "--max-line-bytes", "4096"]


@pytest.fixture
def in_fixtures(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(FIX)
    return FIX


def voiced(entry_replies: list[list]) -> list[list[tuple[str, str]]]:
    return [[(s.voice, s.text) for s in segs if s.text] for segs in entry_replies]


def test_validate_golden_report(in_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_dataset(["validate", "bad.jsonl", *BAD_ARGS])
    out = capsys.readouterr().out
    assert out == (FIX / "bad.expected.txt").read_text(encoding="utf-8")
    assert rc == 1


def test_validate_counts_and_ok_lines() -> None:
    vs = load_voice_set(FIX / "voices.yaml")
    entries = list(iter_entries(FIX / "bad.jsonl", vs, strict=True, max_line_bytes=4096))
    assert [e.line for e in entries] == list(range(1, 29))
    ok = [e.line for e in entries if e.ok]
    # BOM and CRLF lines are usable (warnings), duplicate keys are fine (the last one wins),
    # structured voices, ShareGPT and a closed <think> are valid.
    assert ok == [1, 2, 5, 14, 15, 22]
    dup = entries[4].record
    assert dup is not None and dup.messages[0]["content"] == "dup"
    report = validate(FIX / "bad.jsonl", vs, strict=True, max_line_bytes=4096)
    assert report.examples == 6 and report.bad_lines == 21 and report.warnings == 3
    assert report.skipped == Counter(
        {
            F.UNKNOWN_ROLE: 2,
            F.TOO_LONG: 1,
            F.BAD_JSON: 2,
            F.SPECIAL_TOKEN: 2,
            F.BAD_VOICES: 2,
            F.BAD_UTF8: 1,
            F.TOP_ARRAY: 1,
            F.TOO_DEEP: 1,
            F.EMPTY_REPLY: 2,
            F.UNCLOSED: 1,
            F.WRONG_TYPE: 1,
            F.UNKNOWN_VOICE: 1,
            F.BLANK_WARN: 1,
            F.NO_REPLY: 1,
            F.NOT_OBJECT: 1,
            F.SURROGATE: 1,
            F.NO_MESSAGES: 1,
        }
    )


def test_lenient_mode_accepts_unknown_voices() -> None:
    vs = load_voice_set(FIX / "voices.yaml")
    entries = list(iter_entries(FIX / "bad.jsonl", vs, strict=False, max_line_bytes=4096))
    line13 = entries[12]
    assert line13.ok
    assert voiced(line13.record.replies) == [  # type: ignore[union-attr]
        [("Echo", "who"), ("Narrator", "A voice nobody declared.")]
    ]


def test_convert_round_trip(tmp_path: Path, in_fixtures: Path) -> None:
    vs = load_voice_set(FIX / "voices.yaml")
    out = tmp_path / "clean.jsonl"
    report = convert("bad.jsonl", out, vs, strict=True, max_line_bytes=4096)
    assert report.examples == 6 and sum(report.skipped.values()) == 22
    raw = out.read_bytes()
    assert b"\r" not in raw and not raw.startswith(b"\xef\xbb\xbf")
    issues: list = []
    again = validate(out, vs, strict=True, on_issue=issues.append)
    assert issues == [] and again.examples == 6 and again.checked == 6
    before = [
        voiced(e.record.replies)  # type: ignore[union-attr]
        for e in iter_entries("bad.jsonl", vs, strict=True, max_line_bytes=4096)
        if e.ok
    ]
    after = [voiced(e.record.replies) for e in iter_entries(out, vs, strict=True)]  # type: ignore[union-attr]
    assert after == before
    lines = [json.loads(x) for x in raw.decode().splitlines()]
    assert all(set(d) == {"messages"} for d in lines)
    # Structured voices became markers; ShareGPT became messages with OpenAI roles.
    assert lines[3]["messages"][1] == {
        "role": "assistant",
        "content": "[Echo]\nStructured, you said.\n\n<think>Rendered as a tag.</think>\n\n"
        "[Pulse]\nWarm hands.",
    }
    assert [m["role"] for m in lines[4]["messages"]] == ["system", "user", "assistant"]
    # Converting the converted file changes nothing.
    out2 = tmp_path / "clean2.jsonl"
    convert(out, out2, vs, strict=True)
    assert out2.read_bytes() == raw


def test_convert_cli_summary(
    tmp_path: Path, in_fixtures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.jsonl"
    rc = cli_dataset(["convert", "bad.jsonl", "-o", str(out), *BAD_ARGS])
    cap = capsys.readouterr()
    assert rc == 1
    summary = cap.out.strip()
    assert summary.startswith("converted 6 examples, skipped 22 lines (")
    assert "unknown-role: 2" in summary and "line-too-long: 1" in summary
    assert "bad.jsonl:3: invalid UTF-8 at byte 47" in cap.err
    assert len(out.read_text().splitlines()) == 6


def test_convert_refuses_to_overwrite_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"messages": [{"role": "assistant", "content": "[Echo]\\nhi"}]}\n')
    assert cli_dataset(["convert", str(p), "-o", str(p)]) == 2
    assert "output is also an input" in capsys.readouterr().err
    assert p.read_text().count("Echo") == 1


def test_render_voices_golden() -> None:
    vs = load_voice_set(FIX / "voices.yaml")
    parts = [("Echo", " a \n"), ("main", "b"), ("think", "c"), ("Pulse", "d"), ("main", "e")]
    text = F.render_voices(parts, vs)
    assert text == "[Echo]\na\n\n[/Echo]\nb\n\n<think>c</think>\n\n[Pulse]\nd\n\n[/Pulse]\ne"
    segs = [(s.voice, s.text) for s in parse_text(text, vs) if s.text]
    assert segs == [("Echo", "a"), ("main", "b"), ("think", "c"), ("Pulse", "d"), ("main", "e")]


def test_structured_voices_checks() -> None:
    vs = resolve_voice_set("seed")

    def problems(voices: object, strict: bool = False) -> list[str]:
        obj = {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "voices": voices}]
        }
        return [p.reason for p in F.normalize_record(obj, vs, strict).problems]

    assert problems([{"voice": "echo", "text": "case-insensitive"}]) == []
    rec = F.normalize_record(
        {"messages": [{"role": "assistant", "voices": [{"voice": "echo", "text": "x"}]}]}, vs
    )
    assert rec.messages[0]["content"] == "[Echo]\nx"  # the declared spelling is written
    assert problems([{"voice": "Narrator", "text": "x"}]) == []  # lenient: a new voice
    assert problems([{"voice": "Narrator", "text": "x"}], strict=True) == [
        "messages[1].voices[0].voice: unknown voice 'Narrator' (not in voice set 'seed')"
    ]
    assert problems([{"voice": "9 lives", "text": "x"}])[0].startswith(
        "messages[1].voices[0].voice: '9 lives' is not a valid voice name"
    )
    assert problems([{"voice": "Echo", "text": "  "}]) == [
        "messages[1].voices[0].text: empty voice text"
    ]
    assert problems([]) == ["messages[1].voices: empty list (empty assistant reply)"]
    assert problems("Echo") == ["messages[1].voices: must be an array, got string"]
    assert problems([{"voice": "Echo"}]) == [
        "messages[1].voices[0].text: must be a string, got null"
    ]


def test_sharegpt_file(in_fixtures: Path) -> None:
    entries = list(iter_entries("sharegpt.jsonl"))
    assert all(e.ok for e in entries)
    assert [m["role"] for m in entries[0].record.messages] == ["system", "user", "assistant"]  # type: ignore[union-attr]
    second = entries[1].record
    assert second is not None
    assert second.messages[1]["content"] == "[Pulse]\nWarm hands.\n\n[/Pulse]\nYes, one more."
    assert voiced(second.replies) == [[("Pulse", "Warm hands."), ("main", "Yes, one more.")]]


def test_transcripts(in_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (e,) = iter_entries("transcript.txt")
    assert e.ok and e.record is not None
    assert [m["role"] for m in e.record.messages] == ["assistant"]
    assert voiced(e.record.replies)[0] == [
        ("Echo", "The window, you said. The window again."),
        ("Pulse", "Breath slow."),
        ("Resonance", "Like every spring cleaning: what we keep keeps us too."),
    ]
    rc = cli_dataset(["validate", "bad_transcript.txt", "--voices", "voices.yaml", "--strict"])
    assert rc == 1
    assert capsys.readouterr().out.splitlines() == [
        "bad_transcript.txt:1: warning: CRLF line ending (reported once per file); convert writes LF",
        "bad_transcript.txt:4: reply: unclosed <think> (never closed with </think>)",
        "bad_transcript.txt:8: reply: chat-template special token '<|endoftext|>' in content",
        "bad_transcript.txt:9: invalid UTF-8 at byte 6",
        "checked 1 entry: 0 valid, 1 bad, 1 warning",
    ]


def test_pretty_printed_json_array_hint(tmp_path: Path) -> None:
    p = tmp_path / "array.json"
    p.write_text('[\n  {"messages": []}\n]\n')
    issues: list = []
    validate(p, on_issue=issues.append)
    assert issues[0].line == 1
    assert issues[0].reason.endswith(
        "(the file looks like one JSON array; JSONL needs one object per line)"
    )
    assert [i.line for i in issues] == [1, 2, 3]


def test_json_depth_ignores_strings_and_is_linear() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert json_depth(r'["a\\", [[1]]]') == 3
    assert json_depth(r'["a\"[[[", 1]') == 1
    # Unclosed escaped quotes used to make a regex scan quadratic.
    assert json_depth('"' + '\\"' * 200_000) == 0


def test_stats_exact(in_fixtures: Path) -> None:
    s = dataset_stats("small.jsonl")
    assert s["examples"] == 3 and s["skipped"] == 1
    assert s["skipped_reasons"] == {"invalid-json": 1}
    assert s["messages"] == 7 and s["replies"] == 3
    assert s["roles"] == {"user": 3, "assistant": 3, "system": 1}
    assert s["tokens"] == {"method": "approx", "total": 72, "assistant": 57, "in_voices": 36}
    by = {v["voice"]: v for v in s["voices"]}
    assert [v["voice"] for v in s["voices"]] == ["main", "Echo", "Pulse", "Doubt"]
    assert {k: (v["segments"], v["examples"], v["tokens"]) for k, v in by.items()} == {
        "main": (1, 1, 3),
        "Echo": (4, 3, 22),
        "Pulse": (1, 1, 3),
        "Doubt": (2, 2, 8),
    }
    assert by["Echo"]["share"] == pytest.approx(22 / 36)
    assert by["main"]["declared"] and not any(v["declared"] is False for v in s["voices"])
    assert s["orders"] == [
        {"order": ["Echo", "Doubt"], "count": 1},
        {"order": ["Echo", "Doubt", "Echo"], "count": 1},
        {"order": ["main", "Pulse", "Echo"], "count": 1},
    ]
    assert s["voices_per_reply"] == {"2": 2, "3": 1}
    names, m = s["transitions"]["voices"], s["transitions"]["matrix"]
    got = {(a, b): m[i][j] for i, a in enumerate(names) for j, b in enumerate(names) if m[i][j]}
    assert got == {
        ("Echo", "Doubt"): 2,
        ("Doubt", "Echo"): 1,
        ("main", "Pulse"): 1,
        ("Pulse", "Echo"): 1,
    }
    assert s["reply_tokens"]["bins"] == [
        {"lo": 0, "hi": 15, "count": 0},
        {"lo": 16, "hi": 31, "count": 3},
    ]
    assert (s["reply_tokens"]["min"], s["reply_tokens"]["max"]) == (18, 21)
    assert s["reply_tokens"]["mean"] == pytest.approx(19.0)
    json.dumps(s)  # plain data for --json and the UI


def test_stats_tokenizer_and_terminal_output(in_fixtures: Path) -> None:
    s = dataset_stats("small.jsonl", tokenizer=len)
    assert s["tokens"]["method"] == "tokenizer"
    assert s["tokens"]["assistant"] == sum(
        len(m["content"])
        for line in (FIX / "small.jsonl").read_text().splitlines()[:3]
        for m in json.loads(line)["messages"]
        if m["role"] == "assistant"
    )
    from rich.console import Console

    buf = io.StringIO()
    print_stats(dataset_stats("small.jsonl"), Console(file=buf, width=120))
    text = buf.getvalue()
    assert "Echo → Doubt → Echo" in text and "61.1%" in text and "invalid-json: 1" in text


def test_stats_cli_json(in_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_dataset(["stats", "small.jsonl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]["total"] == 72


def test_approx_tokens() -> None:
    assert approx_tokens("Hello, world!") == 4
    assert approx_tokens("[Echo]\nnaïve café") == 5


def test_cli_user_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert cli_dataset(["validate", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"{missing}: file not found"
    assert cli_dataset(["validate", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli_dataset(["stats", str(FIX / "small.jsonl"), "--voices", "nosuch"]) == 2
    assert "unknown voice preset" in capsys.readouterr().err
    assert cli_dataset(["frobnicate"]) == 2
    assert cli_dataset(["synth", "--out", str(tmp_path / "x.jsonl"), "--holdout", "1.5"]) == 2
    assert "--holdout must be in [0, 1)" in capsys.readouterr().err
    assert cli_dataset(["--help"]) == 0


def test_validate_clean_exit_zero(in_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_dataset(["validate", "sharegpt.jsonl", "transcript.txt"]) == 0
    assert capsys.readouterr().out == "checked 3 entries: 3 valid, 0 bad, 0 warnings\n"


def test_show_escapes_hostile_text(tmp_path: Path) -> None:
    from rich.console import Console

    from thoughtform.data.show import show

    p = tmp_path / "evil.jsonl"
    evil = "[bold red]markup[/] \x1b[2J\x1b]0;pwned\x07"
    p.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": evil},
                    {"role": "assistant", "content": f"[Echo]\n{evil}"},
                ]
            }
        )
        + "\n"
    )
    buf = io.StringIO()
    assert show([p], console=Console(file=buf, width=200, force_terminal=False)) == 1
    out = buf.getvalue()
    assert "\x1b" not in out and "\x07" not in out
    assert out.count("[bold red]markup[/]") == 2  # shown literally, not interpreted
    assert out.count("\\x1b[2J") == 2


def test_null_content_and_pretty_printed_object(tmp_path: Path) -> None:
    vs = resolve_voice_set("seed")
    rec = F.normalize_record(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, vs
    )
    assert [p.reason for p in rec.problems] == ["messages[1].content: must be a string, got null"]
    rec = F.normalize_record({"messages": [{"role": "assistant"}]}, vs)
    assert [p.reason for p in rec.problems] == ["messages[0].content: missing"]
    p = tmp_path / "obj.json"
    p.write_text('{\n  "messages": []\n}\n')
    issues: list = []
    validate(p, on_issue=issues.append)
    assert issues[0].reason.endswith(
        "(the file looks like pretty-printed JSON; JSONL needs one object per line)"
    )


def test_real_process_exit_codes(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "thoughtform.data.cli"]
    bad = subprocess.run(
        [*cmd, "validate", "bad.jsonl", *BAD_ARGS], cwd=FIX, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert bad.stdout == (FIX / "bad.expected.txt").read_text(encoding="utf-8")
    missing = subprocess.run(
        [*cmd, "stats", str(tmp_path / "none.jsonl")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.endswith("none.jsonl: file not found\n")
