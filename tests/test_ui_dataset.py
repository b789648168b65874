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
    open_dataset,
    problems_html,
    stats_html,
    summary_text,
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
    h = stats_html(open_dataset(FIX))
    assert "3 examples, 3 replies" in h
    # Voices in lane order, each with its validated colour as the bar.
    assert re.findall(r'<tr data-voice="(\w+)">', h) == ["main", "Echo", "Pulse", "Doubt"]
    assert "width:100.0%;background:#BB5500" in h  # Echo has the largest share
    assert "<td>16–31</td><td>2</td>" in h and "<td>32–63</td><td>1</td>" in h
    # Echo -> Doubt once, Doubt -> Echo once, main -> Doubt once.
    row = re.search(r"<tr><th>Echo</th>(.*?)</tr>", h)
    assert row is not None and re.findall(r"<td>(\d+)</td>", row.group(1)) == ["0", "0", "1", "1"]


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
            assert page.locator("#ds-stats .tf-ds-voices tr[data-voice=Echo]").count() == 1
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


def _set_slider(page: Any, value: int) -> None:
    box = page.locator("#ds-index input")
    box.fill(str(value))
    box.press("Enter")
