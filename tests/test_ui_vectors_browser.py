"""Voice vectors in real Chromium: a strength slider in the Voices tab moved and applied (the
session's voice set and switch change), and the lanes marking where a vector was in force
(a replay whose token records carry vectors, one of them a voice name that is markup)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.harness import Server, new_session, open_page, send, wait_replies
from thoughtform.vectors.sets import load_vector_set

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "ui"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
DOUBT = range(20, 33)  # the Doubt block's text tokens in voices.jsonl
PULSE = range(37, 43)  # the Pulse block's


def session_row(db: Path, sid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A session's stored settings and voice set."""
    con = sqlite3.connect(db)
    try:
        s, v = con.execute("SELECT settings, voice_set FROM sessions WHERE id=?", (sid,)).fetchone()
    finally:
        con.close()
    return json.loads(s), json.loads(v or "{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("ui-vectors")
    rec = d / "rec"
    rec.mkdir()
    lines = []
    for line in (FIX / "voices.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("type") == "token" and r["index"] in DOUBT:
            r["vector"] = [["Doubt", 1.5]]
        if r.get("type") == "token" and r["index"] in PULSE:
            r["vector"] = [[HOSTILE, 2.0]]
        lines.append(json.dumps(r))
    (rec / "vectors.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    srv = Server(d / "s.db", replay=rec, model="vectors.jsonl", rate=400.0)
    yield srv
    srv.stop()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    pg = open_page(browser, server.url)
    new_session(pg)
    yield pg
    assert pg.errors == [], pg.errors
    pg.context.close()


def slider(page: Any, voice: str) -> Any:
    """The Voices tab's strength slider labelled ``voice``."""
    return page.locator(".tf-vector-slider").filter(has=page.get_by_text(voice, exact=True))


def test_a_moved_slider_sets_the_voice_strength_for_the_session(page: Any, server: Server) -> None:
    sid = page.evaluate("document.querySelector('#tf-wb').dataset.session")
    page.get_by_role("tab", name="Voices").click()
    doubt = slider(page, "Doubt")
    doubt.wait_for(timeout=10_000)
    shown = page.eval_on_selector_all(
        ".tf-vector-slider:not(.hidden) [data-testid=block-info]", "ls => ls.map(l => l.innerText)"
    )
    assert "Doubt" in shown and "Echo" in shown  # one per declared voice
    number = doubt.locator("input[type=number]")
    start = load_vector_set("seed").default_strength("Doubt")  # what the shipped set suggests
    assert float(number.input_value()) == start
    rng = doubt.locator("input[type=range]")
    rng.focus()
    for _ in range(5):  # as a person moves it: five steps of 0.1
        rng.press("ArrowRight" if start <= 1.5 else "ArrowLeft")
    want = round(start + (0.5 if start <= 1.5 else -0.5), 1)
    page.wait_for_function(
        "([el, w]) => Math.abs(parseFloat(el.value) - w) < 1e-6",
        arg=[number.element_handle(), want],
    )
    page.locator("#vectors-on input").check()
    page.click("#apply-vectors")
    page.get_by_text("Voice vectors on for this session").first.wait_for(timeout=10_000)
    settings, voices = session_row(server.db, sid)
    assert settings["voice_vectors"] is True
    by_name = {v["name"]: v for v in voices["voices"]}
    assert by_name["Doubt"]["vector"] == want
    assert "vector" not in by_name["Echo"]  # untouched sliders write nothing
    page.wait_for_function(
        "(w) => document.querySelector('#voices-yaml').innerText.includes('vector: ' + w)",
        arg=f"{want:g}",
    )
    # A fresh page on the session shows what was kept.
    again = open_page(page.context.browser, f"{server.url}?session={sid}")
    try:
        again.get_by_role("tab", name="Voices").click()
        num = slider(again, "Doubt").locator("input[type=number]")
        again.wait_for_function(
            "([el, w]) => Math.abs(parseFloat(el.value) - w) < 1e-6",
            arg=[num.element_handle(), want],
        )
        assert again.locator("#vectors-on input").is_checked()
        assert again.errors == []
    finally:
        again.context.close()


def test_lanes_mark_where_a_vector_was_in_force(page: Any) -> None:
    send(page, "Will the rain stop?")
    wait_replies(page, 1)
    page.click("#tf-wb .tf-viewtab[data-view=lanes]")
    bands = page.locator("#tf-wb .tf-lane[data-voice=Doubt] .tf-vec")
    assert bands.count() == 1  # one band over the whole run of steered tokens
    b = bands.first
    assert (b.get_attribute("data-start"), b.get_attribute("data-end")) == ("20", "32")
    assert b.get_attribute("title") == "Doubt vector ×1.5 · tokens 20–32"
    assert b.is_visible()
    # Unsteered voices have no band; a markup name is only text in the title.
    assert page.locator("#tf-wb .tf-lane[data-voice=Echo] .tf-vec").count() == 0
    pulse = page.locator("#tf-wb .tf-lane[data-voice=Pulse] .tf-vec")
    assert pulse.count() == 1
    assert pulse.first.get_attribute("title") == f"{HOSTILE} vector ×2 · tokens 37–42"
    assert page.locator("#tf-wb img").count() == 0
    assert page.evaluate("() => window.__pwned") is None
    # Zoom moves the bands with the spans; a click reveals the block in the chat.
    page.locator("#tf-wb .tf-zoom").fill("6")
    assert b.get_attribute("style") and "left: 120px" in (b.get_attribute("style") or "")
    b.click()
    doubt = page.locator("#tf-wb .tf-msg[data-role=assistant] .tf-block[data-voice=Doubt]").first
    assert "tf-flash" in (doubt.get_attribute("class") or "")
