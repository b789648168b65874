"""The Compare tab: one prompt, plain and tuned model side by side (unit and in Chromium)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from thoughtform.backends import create_backend
from thoughtform.ui.compare_view import (
    BackendPair,
    compare_html,
    lanes_frame,
    requests,
    run_pair,
    summary_frame,
    voice_colors,
)
from thoughtform.voices import PRESETS

UI_FIX = Path(__file__).parent / "fixtures" / "ui"


def _replay_pair() -> tuple[Any, Any]:
    return (
        create_backend("replay", path=str(UI_FIX / "voices.jsonl")),
        create_backend("replay", path=str(UI_FIX / "hostile.jsonl")),
    )


def test_requests_share_seed_and_length_and_only_plain_gets_the_voice_prompt() -> None:
    plain, tuned = requests("Will it rain?", PRESETS["seed"], seed=7, max_tokens=24)
    assert plain.sampling == tuned.sampling
    assert (plain.sampling.seed, plain.sampling.max_tokens) == (7, 24)
    assert [m.role for m in plain.messages] == ["system", "user"]
    assert "[Echo]" in plain.messages[0].content or "Echo" in plain.messages[0].content
    assert [(m.role, m.content) for m in tuned.messages] == [("user", "Will it rain?")]


def test_side_by_side_blocks_and_lanes_on_a_shared_axis() -> None:
    traces = run_pair(_replay_pair(), "hi")
    left, right = compare_html(traces)
    assert re.findall(r'class="tf-block [^"]*" data-voice="(\w+)"', left) == [
        "Echo",
        "Doubt",
        "Pulse",
        "Glimmer",
        "Shift",
    ]
    assert 'data-side="plain"' in left and 'data-side="tuned"' in right
    # Hostile model text is escaped in the blocks.
    assert "<script>" not in right and "&lt;script&gt;" in right
    # Lanes: one row per token on one axis (79 and 120 tokens), each with its voice.
    lanes = lanes_frame(traces)
    by_model = {m: g for m, g in lanes.groupby("model")}
    first = by_model["plain + voice prompt"]
    assert first["token"].max() < 79 and by_model["tuned (embedded-voices)"]["token"].max() < 120
    echo = first[first["voice"] == "Echo"]["token"]
    doubt = first[first["voice"] == "Doubt"]["token"]
    assert (echo.min(), echo.max(), doubt.min(), doubt.max()) == (0, 16, 17, 33)
    # Summary: tokens per voice per model add up to the tokens in segments.
    summary = summary_frame(traces)
    got = {(m, v): t for m, v, t in summary[["model", "voice", "tokens"]].itertuples(index=False)}
    assert got[("plain + voice prompt", "Echo")] == 17
    assert got[("plain + voice prompt", "Doubt")] == 17
    assert sum(t for (m, _), t in got.items() if m.startswith("plain")) == len(first)
    # Colours: declared voices theirs, Glimmer its own, all valid hex.
    colors = voice_colors(traces)
    assert colors["Echo"] == "#BB5500"
    assert all(re.fullmatch(r"#[0-9A-F]{6}", c) for c in colors.values())
    assert len(set(colors.values())) == len(colors)


def test_lanes_are_deterministic_and_pair_is_made_once() -> None:
    made: list[int] = []

    def factory() -> tuple[Any, Any]:
        made.append(1)
        return _replay_pair()

    pair = BackendPair(factory)
    assert pair.get() is pair.get() and made == [1]
    a = lanes_frame(run_pair(pair.get(), "x"))
    b = lanes_frame(run_pair(pair.get(), "x"))
    assert a.equals(b)
    with pytest.raises(ValueError):
        run_pair(pair.get(), "   ")


@pytest.mark.model
def test_real_models_same_seed_same_reply() -> None:
    pytest.importorskip("llama_cpp")
    from thoughtform.ui.compare_view import llamacpp_pair

    pair = llamacpp_pair()
    a = run_pair(pair, "Should I learn the cello?", max_tokens=24)
    b = run_pair(pair, "Should I learn the cello?", max_tokens=24)
    for t in a:
        assert 0 < len(t.tokens) <= 24
    assert [t.source_text or "".join(k.text for k in t.tokens) for t in a] == [
        t.source_text or "".join(k.text for k in t.tokens) for t in b
    ]
    # The tuned model speaks in voices.
    assert any(s.voice != "main" for s in a[1].segments)


@pytest.mark.browser
@pytest.mark.model
def test_compare_tab_in_chromium(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("llama_cpp")
    from thoughtform.ui.harness import Server, launch, open_page

    srv = Server(tmp_path / "s.db", replay=UI_FIX, model="voices.jsonl", rate=200.0)
    try:
        with playwright.sync_playwright() as pw:
            br = launch(pw)
            page = open_page(br, srv.url)
            page.get_by_role("tab", name="Compare").click()
            box = page.locator("#cmp-prompt textarea")
            box.fill("Should I learn the cello?")
            page.click("#cmp-run")
            page.wait_for_selector("#cmp-left .tf-cmp-col", timeout=90_000)
            for side in ("left", "right"):
                n = page.locator(f"#cmp-{side} .tf-block[data-voice]").count()
                assert n >= 1, side
            # Lanes and their summary are Gradio's plots.
            page.wait_for_selector("#cmp-lanes canvas, #cmp-lanes svg", timeout=30_000)
            page.wait_for_selector("#cmp-summary canvas, #cmp-summary svg", timeout=30_000)
            tuned = page.eval_on_selector_all(
                "#cmp-right .tf-block", "bs => bs.map(b => b.dataset.voice)"
            )
            assert any(v != "main" for v in tuned)
            assert page.errors == []
            br.close()
    finally:
        srv.stop()
