"""The Council tab in real Chromium against a real server (replay backend): a 4-member council
streams into turn blocks, one lane per member, the resonance matrix beside it; pause, resume,
the user as a voice; hostile turn text and hostile voice names are rendered as text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.harness import Server, open_page, pick

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "council"
MEMBERS = ["Echo", "Doubt", "Pulse", "Shift"]
TURNS = "#tf-council .tf-c-turn"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("council-ui")
    srv = Server(d / "sessions.db", replay=FIX / "hostile.txt", model=None, rate=150.0)
    yield srv
    srv.stop()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    pg = open_page(browser, server.url)
    pg.get_by_role("tab", name="Council").click()
    pg.wait_for_selector("#tf-council .tf-c-empty", timeout=30_000)
    yield pg
    assert pg.errors == [], pg.errors
    assert pg.dialogs == [], pg.dialogs
    pg.context.close()


def turns(page: Any) -> list[dict[str, Any]]:
    return list(
        page.evaluate(
            """() => Array.from(document.querySelectorAll('#tf-council .tf-c-turn')).map(b => ({
                turn: b.dataset.turn, voice: b.dataset.voice, by: b.dataset.by,
                finish: b.dataset.finish, text: b.querySelector('.tf-c-text').textContent,
                label: b.querySelector('.tf-c-label').textContent}))"""
        )
    )


def start(page: Any, text: str, n_turns: int = 4) -> None:
    page.locator("#council-text textarea").fill(text)
    page.locator("#council-turns input").fill(str(n_turns))
    page.click("#council-start")


def wait_state(page: Any, state: str, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "(s) => document.querySelector('#tf-council').dataset.state === s",
        arg=state,
        timeout=timeout,
    )


def test_four_member_council_lanes_matrix_and_hostile_text(page: Any) -> None:
    start(page, "Is the sea here? <img src=x onerror=window.__pwned=9>")
    # Blocks appear while the council runs (the first before the last turn is done).
    page.wait_for_selector(f"{TURNS}[data-voice=Echo]", timeout=60_000)
    wait_state(page, "done")
    got = turns(page)
    assert [t["voice"] for t in got] == ["(user)", *MEMBERS]
    assert [t["turn"] for t in got] == ["0", "1", "2", "3", "4"]
    assert got[0]["text"] == "Is the sea here? <img src=x onerror=window.__pwned=9>"
    assert got[1]["text"] == 'The sea <img src=x onerror="window.__pwned=1"> is here, you said.'
    assert "<script>window.__pwned=2</script>" in got[2]["text"]
    assert got[4]["text"].endswith("<style>*{display:none}</style>")
    assert all(t["by"] == "rule" and t["finish"] in ("cut", "stop") for t in got[1:])
    # One lane per member (and one for you), a mark per turn in its speaker's lane.
    lanes = page.evaluate(
        """() => Array.from(document.querySelectorAll('#tf-council .tf-c-lane')).map(l =>
            [l.dataset.voice, Array.from(l.querySelectorAll('.tf-c-mark')).map(m => m.dataset.turn)])"""
    )
    assert lanes == [["(user)", ["0"]], ["Echo", ["1"]], ["Doubt", ["2"]], ["Pulse", ["3"]],
                     ["Shift", ["4"]]]  # fmt: skip
    # The matrix beside: a row per speaker with earlier turns, a column per speaker.
    cols = page.eval_on_selector_all(
        "#tf-council .tf-c-table th.tf-c-col", "e => e.map(x => x.textContent)"
    )
    assert cols == ["you", *MEMBERS]
    rows = page.eval_on_selector_all(
        "#tf-council .tf-c-table tr[data-row]", "e => e.map(x => x.dataset.row)"
    )
    assert rows == MEMBERS
    cell = page.text_content("#tf-council tr[data-row=Doubt] td[data-col=Echo]")
    assert cell is not None and cell.endswith("%") and cell != "0%"
    # Nothing hostile ran or became markup.
    assert page.evaluate("window.__pwned") is None
    assert (
        page.eval_on_selector_all(
            "#tf-council img, #tf-council script, #tf-council style, #tf-council b", "e => e.length"
        )
        == 0
    )
    assert page.is_visible(f"{TURNS}[data-voice=Shift]")  # the <style> text hid nothing


def test_pause_resume_and_speaking_as_a_voice(page: Any) -> None:
    start(page, "Pause me", n_turns=12)
    page.wait_for_selector(f"{TURNS}[data-voice=Echo][data-finish=cut]", timeout=60_000)
    page.click("#council-pause")
    wait_state(page, "paused")
    n = len(turns(page))
    assert 2 <= n < 13  # stopped after the turn in progress, well before the twelfth
    assert all(t["finish"] in ("cut", "stop") for t in turns(page))  # none cut short
    # Speak as Doubt: the text becomes Doubt's turn, written by you.
    pick(page, "council-as", "Doubt")
    page.locator("#council-text textarea").fill("I, Doubt, <b>doubt</b> it.")
    page.click("#council-say")
    page.wait_for_function(
        "(n) => document.querySelectorAll('#tf-council .tf-c-turn').length > n",
        arg=n,
        timeout=30_000,
    )
    mine = turns(page)[-1]
    assert (mine["voice"], mine["by"], mine["text"]) == (
        "Doubt",
        "user",
        "I, Doubt, <b>doubt</b> it.",
    )
    page.locator("#council-turns input").fill("1")
    page.click("#council-resume")
    page.wait_for_function(
        "(n) => document.querySelectorAll('#tf-council .tf-c-turn').length > n + 1",
        arg=n,
        timeout=60_000,
    )
    wait_state(page, "done")
    assert turns(page)[-1]["by"] == "rule"


def test_hostile_voice_names_and_colours_render_as_text(page: Any) -> None:
    # A snapshot straight into the renderer, as a compromised or buggy server might send it.
    name = '<img src=x onerror="window.__pwned=7">'
    snap = {
        "n": 999, "kind": "council", "id": "c-hostile", "state": "done", "policy": "model",
        "title": "<script>window.__pwned=8</script>",
        "members": [{"name": name, "color": "red;background:url(https://evil.invalid/x)",
                     "backend": "<img src=x onerror=window.__pwned=5>"},
                    {"name": "Echo", "color": "#BB5500"}],
        "voices": {}, "error": "<b>no</b>",
        "turns": [{"i": 0, "voice": name, "text": "<script>window.__pwned=6</script>",
                   "by": "model", "source": "model", "policy": "model", "finish": "stop",
                   "probs": {name: 0.75, "Echo": 0.25}},
                  {"i": 1, "voice": "Echo", "text": "x", "by": "rule", "source": "model",
                   "policy": "list", "finish": "stop", "probs": {}}],
        "matrix": {"labels": [name, "Echo"], "values": [[0.5, None], [0.25, None]]},
        "arcs": [{"to": 1, "from": 0, "w": 0.5}, {"to": "<b>x</b>", "from": 0, "w": 0.5},
                 {"to": 1, "from": 0, "w": "<img src=x onerror=window.__pwned=4>"}],
        "shown": "<script>", "measure_note": "<b>note</b>", "unit": "share",
    }  # fmt: skip
    page.evaluate(
        "(s) => window.thoughtformCouncil.instances.at(-1).receive(JSON.stringify(s))", snap
    )
    page.wait_for_selector("#tf-council [data-turn='0'] .tf-c-label")
    label = page.text_content("#tf-council .tf-c-turn .tf-c-label")
    assert label == name
    lane = page.eval_on_selector("#tf-council .tf-c-lane", "e => [e.dataset.voice, e.textContent]")
    assert lane[0] == name and name in lane[1]
    probs = page.eval_on_selector_all(
        "#tf-council .tf-c-prob-label", "e => e.map(x => x.textContent)"
    )
    assert probs == [f"{name} 0.75", "Echo 0.25"]
    assert page.text_content("#tf-council .tf-c-text") == "<script>window.__pwned=6</script>"
    # The arc (only the well-formed one) is titled with the hostile name as text.
    titles = page.eval_on_selector_all(
        "#tf-council path.tf-c-arc title", "e => e.map(x => x.textContent)"
    )
    assert titles == [f"Echo (turn 2) draws on {name} (turn 1): 0.50"]
    assert page.text_content("#tf-council .tf-c-measure-note") == "<b>note</b>"
    assert page.text_content("#tf-council .tf-c-side-title") == "Resonance (echo)"
    backend = page.text_content("#tf-council .tf-c-lane .tf-c-lane-backend")
    assert backend == "<img src=x onerror=window.__pwned=5>"
    status = page.text_content("#tf-council .tf-c-status")
    assert (
        status is not None
        and "<script>window.__pwned=8</script>" in status
        and "<b>no</b>" in status
    )
    # The bad colour was never used: the grey fallback instead.
    color = page.eval_on_selector("#tf-council .tf-c-label", "e => e.style.color")
    assert color == "rgb(119, 119, 119)"
    assert page.evaluate("window.__pwned") is None
    assert (
        page.eval_on_selector_all(
            "#tf-council img, #tf-council script, #tf-council b", "e => e.length"
        )
        == 0
    )
    assert json.dumps(snap)  # the payload itself was well-formed JSON


def order(page: Any) -> list[list[Any]]:
    return list(
        page.eval_on_selector_all(
            "#tf-council-order li",
            "e => e.map(x => [x.dataset.voice, x.querySelector('input').checked])",
        )
    )


def test_reorder_members_by_drag_and_keys_then_the_council_speaks_so(page: Any) -> None:
    got = order(page)
    assert got[:4] == [[m, True] for m in MEMBERS] and all(not on for _, on in got[4:])
    # Each member shows the backend it speaks through, as text.
    be = page.text_content("#tf-council-order li[data-voice=Echo] .tf-c-order-backend")
    assert be == "replay · hostile.txt"
    # Drag Shift onto the top half of Echo's row: Shift goes first.
    page.locator("#tf-council-order li[data-voice=Shift]").drag_to(
        page.locator("#tf-council-order li[data-voice=Echo]"), target_position={"x": 20, "y": 2}
    )
    assert [n for n, _ in order(page)][:4] == ["Shift", "Echo", "Doubt", "Pulse"]
    # The keyboard way: Alt+Up on a focused row, and the row's move-down button.
    page.locator("#tf-council-order li[data-voice=Doubt]").focus()
    page.keyboard.press("Alt+ArrowUp")
    assert [n for n, _ in order(page)][:4] == ["Shift", "Doubt", "Echo", "Pulse"]
    page.get_by_role("button", name="move Shift down").click()
    assert [n for n, _ in order(page)][:4] == ["Doubt", "Shift", "Echo", "Pulse"]
    page.get_by_role("checkbox", name="in the council: Pulse").uncheck()
    box = page.locator("#council-members textarea, #council-members input").first
    assert json.loads(box.input_value()) == ["Doubt", "Shift", "Echo"]
    pick(page, "council-policy", "list")
    start(page, "Is the sea here?", n_turns=3)
    wait_state(page, "done")
    assert [t["voice"] for t in turns(page)] == ["(user)", "Doubt", "Shift", "Echo"]
    lanes = page.eval_on_selector_all("#tf-council .tf-c-lane", "e => e.map(x => x.dataset.voice)")
    assert lanes == ["(user)", "Doubt", "Shift", "Echo"]
    lane_be = page.text_content("#tf-council .tf-c-lane[data-voice=Doubt] .tf-c-lane-backend")
    assert lane_be == "replay"
    # The arcs: one path per arc of the payload, between the two turns' marks, titled.
    want = page.evaluate("() => window.thoughtformCouncil.instances.at(-1).arcData.arcs")
    assert want and all(a["from"] < a["to"] for a in want)
    drawn = page.eval_on_selector_all(
        "#tf-council svg.tf-c-arcs path.tf-c-arc",
        """e => e.map(p => ({to: +p.dataset.to, from: +p.dataset.from, w: +p.dataset.w,
            width: +p.getAttribute('stroke-width'), title: p.querySelector('title').textContent}))""",
    )
    assert [(d["to"], d["from"], d["w"]) for d in drawn] == [
        (a["to"], a["from"], a["w"]) for a in want
    ]
    names = {0: "you", 1: "Doubt", 2: "Shift", 3: "Echo"}
    for d in drawn:
        head, _, value = d["title"].rpartition(": ")
        assert head == (
            f"{names[d['to']]} (turn {d['to'] + 1}) draws on {names[d['from']]} "
            f"(turn {d['from'] + 1})"
        )
        assert len(value) == 4 and float(value) == pytest.approx(d["w"], abs=0.0051)
        assert d["width"] == pytest.approx(1 + 5 * d["w"], abs=0.01)  # thicker when stronger
    # A measure the replay backend cannot give: one line says so, echo stays.
    page.locator("#council-measure").get_by_text("counterfactual", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#tf-council .tf-c-measure-note').textContent !== ''",
        timeout=30_000,
    )
    note = page.text_content("#tf-council .tf-c-measure-note")
    assert note is not None and note.startswith("counterfactual: backend replay cannot score")
    assert page.text_content("#tf-council .tf-c-side-title") == "Resonance (echo)"
    assert page.eval_on_selector_all("#tf-council path.tf-c-arc", "e => e.length") == len(want)
