"""The Dataset tab: problems, statistics and examples of a dataset file (unit and in Chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from thoughtform.data.lines import DatasetError
from thoughtform.ui.dataset_view import (
    example_html,
    lengths_frame,
    lengths_text,
    open_dataset,
    problems_html,
    sample_dataset,
    stats_html,
    summary_text,
    voice_colors,
    voices_frame,
)

FIX = Path(__file__).parent / "fixtures" / "ui_dataset" / "mixed.jsonl"
UI_FIX = Path(__file__).parent / "fixtures" / "ui"


def test_problems_are_listed_with_path_and_line() -> None:
    v = open_dataset(FIX)
    assert [i.format() for i in v.issues] == [
        f"{FIX}:2: invalid JSON: Expecting value at column 1",
        f"{FIX}:4: messages: no assistant reply",
    ]
    assert summary_text(v) == ("5 entries, 3 usable examples, 2 bad lines, 2 errors, 0 warnings")
    h = problems_html(v)
    assert h.count("<tr") == 2 and f"{FIX}:4: messages: no assistant reply" in h


def test_stats_show_voices_lengths_and_transitions() -> None:
    v = open_dataset(FIX)
    h = stats_html(v)
    assert "3 examples, 3 replies" in h
    # Per-voice rows in lane order, shares in percent: the table and the bars of the chart.
    frame = voices_frame(v.stats)
    assert list(frame["voice"]) == ["main", "Echo", "Pulse", "Doubt"]
    assert list(frame["tokens"]) == [3, 40, 10, 7]
    assert list(frame["segments"]) == [1, 3, 1, 2]
    assert list(frame["share"]) == [5.0, 66.7, 16.7, 11.7]
    # Each bar in its voice's validated colour.
    assert voice_colors(v.stats) == {
        "main": "#777777",
        "Echo": "#BB5500",
        "Pulse": "#CC0044",
        "Doubt": "#EE22AA",
    }
    lengths = lengths_frame(v.stats)
    assert lengths.values.tolist() == [["0–15", 0], ["16–31", 2], ["32–63", 1]]
    assert lengths_text(v.stats) == "reply tokens: min 17, max 43, mean 26.0"
    # Echo -> Doubt once, Doubt -> Echo once, main -> Doubt once; the table scrolls sideways.
    assert '<div class="tf-scroll-x"><table class="tf-ds-transitions">' in h
    row = re.search(r"<tr><th>Echo</th>(.*?)</tr>", h)
    assert row is not None and re.findall(r"<td>(\d+)</td>", row.group(1)) == ["0", "0", "1", "1"]


def test_sample_dataset_is_synth_output_that_opens_clean(tmp_path: Path) -> None:
    path = sample_dataset(tmp_path)
    assert path.parent == tmp_path
    v = open_dataset(path)
    assert v.report.examples == 40 and v.report.errors == 0 and not v.issues
    # It speaks in the seed voices, several per reply.
    assert {"Echo", "Doubt", "Pulse"} <= set(voices_frame(v.stats)["voice"])
    assert len(v.examples) == 40
    assert sample_dataset(tmp_path).read_bytes() == path.read_bytes()  # same every time


def test_example_renders_voice_blocks_and_escapes_everything() -> None:
    v = open_dataset(FIX)
    first = example_html(v, 0)
    assert re.findall(r'<details class="tf-block [^"]*" data-voice="(\w+)"', first) == [
        "Echo",
        "Doubt",
    ]
    hostile = example_html(v, 1)
    assert "<script>" not in hostile and "<img" not in hostile and "<b>" not in hostile
    assert "&lt;script&gt;window.__pwned=2&lt;/script&gt;" in hostile
    assert "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in hostile  # the prompt
    # Out-of-range indexes clamp to the last example.
    assert 'data-index="2"' in example_html(v, 99)


def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        open_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError):
        open_dataset("  ")


@pytest.mark.browser
def test_dataset_tab_in_chromium(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    from thoughtform.ui.harness import Server, launch, open_page

    srv = Server(tmp_path / "s.db", replay=UI_FIX, model="voices.jsonl", rate=200.0)
    try:
        with playwright.sync_playwright() as pw:
            br = launch(pw)
            page = open_page(br, srv.url)
            page.get_by_role("tab", name="Dataset").click()
            page.locator("#ds-path textarea, #ds-path input").first.fill(str(FIX))
            page.click("#ds-open")
            page.wait_for_selector("#ds-problems .tf-ds-problems", timeout=30_000)
            rows = page.eval_on_selector_all(
                "#ds-problems .tf-ds-problems td", "ts => ts.map(t => t.innerText)"
            )
            assert rows == [
                f"{FIX}:2: invalid JSON: Expecting value at column 1",
                f"{FIX}:4: messages: no assistant reply",
            ]
            voices = page.eval_on_selector_all(
                "#ds-example .tf-block", "bs => bs.map(b => b.dataset.voice)"
            )
            assert voices == ["Echo", "Doubt"]
            # The charts are Gradio's own plots (Vega), not hand-made markup.
            page.wait_for_selector("#ds-shares canvas, #ds-shares svg", timeout=30_000)
            page.wait_for_selector("#ds-lengths canvas, #ds-lengths svg", timeout=30_000)
            cells = page.eval_on_selector_all(
                "#ds-voices [data-testid$='-0']", "cs => cs.map(c => c.innerText.trim())"
            )
            assert "Echo" in cells and "Doubt" in cells
            # Move to the hostile example: shown as text, nothing runs.
            _set_slider(page, 1)
            page.wait_for_selector("#ds-example .tf-ds-example[data-index='1']", timeout=10_000)
            body = page.inner_text("#ds-example .tf-block[data-voice=Echo] .tf-body")
            assert "<script>window.__pwned=2</script>" in body
            assert page.evaluate("window.__pwned") is None
            assert page.locator("#ds-example img, #ds-example script").count() == 0
            # The same file uploaded: the problems now name the uploaded copy, same lines.
            page.set_input_files("#ds-upload input[type=file]", str(FIX))
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('#ds-problems td'))"
                ".some(t => t.innerText.includes('mixed.jsonl:4:') && !t.innerText.includes("
                f"{json.dumps(str(FIX))}))",
                timeout=30_000,
            )
            assert page.errors == []
            br.close()
    finally:
        srv.stop()


@pytest.mark.browser
def test_sample_dataset_in_chromium_and_wide_tables_scroll(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    from thoughtform.ui.harness import Server, launch, open_page

    srv = Server(tmp_path / "s.db", replay=UI_FIX, model="voices.jsonl", rate=200.0)
    try:
        with playwright.sync_playwright() as pw:
            br = launch(pw)
            page = open_page(br, srv.url, width=1000)
            page.get_by_role("tab", name="Dataset").click()
            page.click("#ds-sample")  # no file of one's own needed
            page.wait_for_selector("#ds-problems .tf-ds-ok", timeout=60_000)
            assert page.inner_text("#ds-summary").startswith("40 entries, 40 usable examples")
            page.wait_for_selector("#ds-shares canvas, #ds-shares svg", timeout=30_000)
            assert page.locator("#ds-example .tf-block[data-voice]").count() >= 1
            # Eight voices make the transition table wider than its column: it scrolls.
            wrap = page.locator("#ds-stats .tf-scroll-x")
            width, client, overflow = wrap.evaluate(
                "w => [w.scrollWidth, w.clientWidth, getComputedStyle(w).overflowX]"
            )
            assert overflow == "auto" and width > client
            wrap.evaluate("w => { w.scrollLeft = w.scrollWidth; }")
            last = page.locator("#ds-stats .tf-ds-transitions thead th").last
            lb, wb = last.bounding_box(), wrap.bounding_box()
            assert lb and wb and lb["x"] + lb["width"] <= wb["x"] + wb["width"] + 1
            assert page.errors == []
            br.close()
    finally:
        srv.stop()


def _set_slider(page: Any, value: int) -> None:
    box = page.locator("#ds-index input")
    box.fill(str(value))
    box.press("Enter")
