"""The Council tab in real Chromium with per-voice bindings: the session's voice set puts Doubt
and Pulse on recordings of their own (``serve --replay DIR``), the member list says so (a hostile
file name as text), the council runs them there, and opening a saved council brings back its
members in its order."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.harness import Server, launch, open_page, pick
from thoughtform.ui.store import Store
from thoughtform.voices import PRESETS

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "council"
HOSTILE_FILE = "<img src=x onerror=window.__pwned=3>.txt"
ROWS = "#tf-council-order li"
TURNS = "#tf-council .tf-c-turn"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    d = tmp_path_factory.mktemp("council-bindings")
    rec = d / "replays"
    rec.mkdir()
    shutil.copy(FIX / "hostile.txt", rec / "0-hostile.txt")  # first: the shared default
    shutil.copy(FIX / "sea.txt", rec / "sea.txt")
    shutil.copy(FIX / "sea.txt", rec / HOSTILE_FILE)
    vs = PRESETS["seed"].to_dict()
    for v in vs["voices"]:
        if v["name"] == "Doubt":
            v.update(backend="replay", model="sea.txt")
        if v["name"] == "Pulse":
            v.update(backend="replay", model=HOSTILE_FILE)
    store = Store(d / "sessions.db")
    sid = store.create_session("bound voices", voice_set=vs)
    store.close()
    srv = Server(d / "sessions.db", replay=rec, model=None, rate=200.0)
    yield srv, sid
    srv.stop()


@pytest.fixture
def page(server: tuple[Server, str]) -> Iterator[Any]:
    srv, sid = server
    with playwright.sync_playwright() as pw:
        br = launch(pw)
        pg = open_page(br, f"{srv.url}?session={sid}")
        pg.get_by_role("tab", name="Council").click()
        pg.wait_for_selector("#tf-council .tf-c-empty", timeout=30_000)
        yield pg
        assert pg.errors == [], pg.errors
        assert pg.dialogs == [], pg.dialogs
        br.close()


def order(page: Any) -> list[list[Any]]:
    return list(
        page.eval_on_selector_all(
            ROWS,
            """e => e.map(x => [x.dataset.voice, x.querySelector('input').checked,
                x.querySelector('.tf-c-order-backend').textContent])""",
        )
    )


def members_box(page: Any) -> list[str]:
    box = page.locator("#council-members textarea, #council-members input").first
    return list(json.loads(box.input_value()))


def run(page: Any, text: str, n_turns: int) -> None:
    pick(page, "council-policy", "list")
    page.locator("#council-text textarea").fill(text)
    page.locator("#council-turns input").fill(str(n_turns))
    page.click("#council-start")
    page.wait_for_function(
        """([text, n]) => {
            var b = document.querySelectorAll('#tf-council .tf-c-turn');
            return document.querySelector('#tf-council').dataset.state === 'done'
                && b.length === n && b[0].querySelector('.tf-c-text').textContent === text; }""",
        arg=[text, n_turns + 1],
        timeout=60_000,
    )


def voices_said(page: Any) -> list[list[str]]:
    return list(
        page.eval_on_selector_all(
            TURNS,
            "e => e.map(b => [b.dataset.voice, b.querySelector('.tf-c-text').textContent])",
        )
    )


def test_bound_members_shown_run_and_an_opened_council_restores_its_members(page: Any) -> None:
    # The session's voice set: Doubt and Pulse on recordings of their own, shown as text.
    page.wait_for_function(
        "() => { var e = document.querySelector('#tf-council-order li[data-voice=Doubt] "
        ".tf-c-order-backend'); return e && e.textContent === 'replay · sea.txt'; }",
        timeout=30_000,
    )
    got = order(page)
    assert got[:4] == [
        ["Echo", True, "replay · replays"],
        ["Doubt", True, "replay · sea.txt"],
        ["Pulse", True, f"replay · {HOSTILE_FILE}"],
        ["Shift", True, "replay · replays"],
    ]
    page.get_by_role("checkbox", name="in the council: Shift").uncheck()
    assert members_box(page) == ["Echo", "Doubt", "Pulse"]
    run(page, "First council", 3)
    said = voices_said(page)
    assert said == [
        ["(user)", "First council"],
        ["Echo", 'The sea <img src=x onerror="window.__pwned=1"> is here, you said.'],
        ["Doubt", "Is the sea blue, or is it the sky in it?"],  # its own recording
        ["Pulse", "Salt on the lips."],
    ]
    # A second council in another order and with other members.
    page.get_by_role("checkbox", name="in the council: Shift").check()
    page.get_by_role("checkbox", name="in the council: Echo").uncheck()
    page.get_by_role("button", name="move Shift up").click()
    page.get_by_role("button", name="move Shift up").click()
    assert members_box(page) == ["Shift", "Doubt", "Pulse"]
    run(page, "Second council", 3)
    assert [v for v, _ in voices_said(page)] == ["(user)", "Shift", "Doubt", "Pulse"]
    # Opening the first one again: its members, in its order, ticked, on their backends.
    pick(page, "council-saved", "Council: First council")
    page.click("#council-open")
    page.wait_for_function(
        "() => { var li = document.querySelector('#tf-council-order li'); "
        "return li.dataset.voice === 'Echo' && li.querySelector('input').checked; }",
        timeout=30_000,
    )
    got = order(page)
    assert [(n, on) for n, on, _ in got[:4]] == [
        ("Echo", True),
        ("Doubt", True),
        ("Pulse", True),
        ("Resonance", False),
    ]
    assert got[1][2] == "replay" and all(not on for _, on, _ in got[3:])
    assert members_box(page) == ["Echo", "Doubt", "Pulse"]
    assert [v for v, _ in voices_said(page)] == ["(user)", "Echo", "Doubt", "Pulse"]
    # Spoken to and resumed, it goes on with the same members on the same backends.
    page.locator("#council-text textarea").fill("Again?")
    page.click("#council-say")
    page.wait_for_function(
        "() => document.querySelectorAll('#tf-council .tf-c-turn').length === 5", timeout=30_000
    )
    page.locator("#council-turns input").fill("2")
    page.click("#council-resume")
    page.wait_for_function(
        "() => document.querySelectorAll('#tf-council .tf-c-turn').length === 7"
        " && document.querySelector('#tf-council').dataset.state === 'done'",
        timeout=60_000,
    )
    assert voices_said(page)[-1] == ["Doubt", "Is the sea blue, or is it the sky in it?"]
    # Nothing hostile ran or became markup.
    assert page.evaluate("window.__pwned") is None
    assert page.eval_on_selector_all("#tf-council-order img, #tf-council img", "e => e.length") == 0
