"""Steering in the workbench, in real Chromium: the legend's next/mute buttons, the Structure
switch, the voice-choice charts and the model's own transition matrix (replay server with a
seeded database), and "next" on the real embedded voices model."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.generate import replay_generation
from thoughtform.trace import load_trace
from thoughtform.ui.harness import (
    Server,
    blocks,
    new_session,
    open_page,
    send,
    session_of,
    wait_replies,
)
from thoughtform.ui.store import Store

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "ui"
SEED_ORDER = ["Echo", "Doubt", "Pulse", "Glimmer", "Shift"]
# Who-speaks-next at the five boundaries of the fixture reply (one more after its end).
# A voice name that is markup must reach the page as text.
HOSTILE = '<img src=x onerror="window.__pwned=1">'
CHOICES: list[dict[str, Any]] = [
    {"probs": {"Echo": 0.5, "Doubt": 0.2, "Pulse": 0.1, HOSTILE: 0.05}, "forced": False},
    {"probs": {"Echo": 0.05, "Doubt": 0.6, "Pulse": 0.2, HOSTILE: 0.01}, "forced": True},
    {"probs": {"Echo": 0.1, "Doubt": 0.1, "Pulse": 0.7, HOSTILE: 0.0}, "forced": False},
]


def settings_of(db: Path, sid: str) -> dict[str, Any]:
    con = sqlite3.connect(db)
    try:
        (raw,) = con.execute("SELECT settings FROM sessions WHERE id=?", (sid,)).fetchone()
    finally:
        con.close()
    return dict(json.loads(raw))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A database with one session whose stored reply carries voice_choice records."""
    d = tmp_path_factory.mktemp("ui-steer")
    db = d / "s.db"
    trace = load_trace(FIX / "voices.jsonl")
    store = Store(db)
    sid = store.create_session(title="choices", settings={"backend": "replay"})
    store.add_message(sid, "user", "Will the rain stop?")
    reply = store.add_message(sid, "assistant", None, status="streaming")
    store.append_tokens(reply.id, trace.tokens)
    # The reply's blocks as the workbench reads them (the fixture stores only tokens).
    segs = [s for s in replay_generation(trace.tokens, "seed").run().segments if s.tokens]
    starts = [s.tokens[0] for s in segs][: len(CHOICES)]
    chosen = [s.voice for s in segs][: len(CHOICES)]
    recs = [{"token": t, "chosen": v, **c} for t, v, c in zip(starts, chosen, CHOICES, strict=True)]
    store.finish_message(reply.id, "done", {"reason": "stop", "voice_choices": recs}, trace.text)
    store.close()
    return db, sid


@pytest.fixture(scope="module")
def server(seeded: tuple[Path, str]) -> Iterator[Server]:
    srv = Server(seeded[0], replay=FIX, model="voices.jsonl", rate=200.0)
    yield srv
    srv.stop()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    pg = open_page(browser, server.url)
    yield pg
    assert pg.errors == [], pg.errors
    pg.context.close()


def chip_state(page: Any, voice: str) -> dict[str, Any]:
    return dict(
        page.evaluate(
            """(v) => {
              const w = document.querySelector(`#tf-wb .tf-legchip[data-voice="${v}"]`);
              const q = (a) => w.querySelector(`[data-action=${a}][data-voice="${v}"]`);
              return {muted: w.classList.contains('tf-muted'),
                      legMuted: w.querySelector('.tf-leg').classList.contains('tf-muted'),
                      mute: q('mute').getAttribute('aria-pressed'),
                      next: q('next').getAttribute('aria-pressed')};
            }""",
            voice,
        )
    )


def wait_idle(page: Any) -> None:
    page.wait_for_function("() => !document.querySelector('#tf-wb').dataset.steerBusy")


def reload(page: Any, server: Server, sid: str) -> None:
    page.goto(f"{server.url}?session={sid}")
    page.wait_for_function(
        "(sid) => document.querySelector('#tf-wb')?.dataset.session === sid",
        arg=sid,
        timeout=60_000,
    )


def test_mute_and_next_persist_across_a_reload(page: Any, server: Server) -> None:
    sid = new_session(page)
    # Every declared voice's chip has both buttons, in the legend's order.
    names = page.eval_on_selector_all(
        "#tf-wb .tf-legchip [data-action=mute]", "bs => bs.map(b => b.dataset.voice)"
    )
    assert names[:3] == ["Echo", "Resonance", "Inner"] and "Doubt" in names
    page.click("#tf-wb [data-action=mute][data-voice=Doubt]")
    page.wait_for_function(
        "() => document.querySelector('#tf-wb .tf-legchip[data-voice=Doubt]')"
        ".classList.contains('tf-muted')"
    )
    assert chip_state(page, "Doubt") == {
        "muted": True,
        "legMuted": True,
        "mute": "true",
        "next": "false",
    }
    assert chip_state(page, "Echo")["muted"] is False
    page.click("#tf-wb [data-action=next][data-voice=Pulse]")
    page.wait_for_function(
        "() => document.querySelector('#tf-wb [data-action=next][data-voice=Pulse]')"
        ".getAttribute('aria-pressed') === 'true'"
    )
    wait_idle(page)
    s = settings_of(server.db, sid)
    assert s["muted"] == ["Doubt"] and s["next_voice"] == "Pulse"
    # Saving Settings (with Structure on) keeps the legend's state.
    page.get_by_role("tab", name="Settings").click()
    page.locator("#set-structure input").check()
    page.click("#save-settings")
    page.get_by_text("Settings saved").first.wait_for(timeout=10_000)
    s = settings_of(server.db, sid)
    assert s["structure"] is True and s["muted"] == ["Doubt"] and s["next_voice"] == "Pulse"
    page.get_by_role("tab", name="Workbench").click()
    reload(page, server, sid)
    assert chip_state(page, "Doubt")["muted"] is True
    assert chip_state(page, "Pulse")["next"] == "true"
    page.get_by_role("tab", name="Settings").click()
    assert page.locator("#set-structure input").is_checked()
    page.get_by_role("tab", name="Workbench").click()
    # Mute again: unmuted, on the page and in the session.
    page.click("#tf-wb [data-action=mute][data-voice=Doubt]")
    page.wait_for_function(
        "() => !document.querySelector('#tf-wb .tf-legchip[data-voice=Doubt]')"
        ".classList.contains('tf-muted')"
    )
    wait_idle(page)
    assert settings_of(server.db, sid)["muted"] == []
    # "next" is used by the next reply (the replay backend plays its recording whole; the
    # forced voice itself is checked on the real model below), then cleared.
    send(page, "go")
    wait_replies(page, 1)
    assert settings_of(server.db, sid)["next_voice"] is None
    page.wait_for_function(
        "() => document.querySelector('#tf-wb [data-action=next][data-voice=Pulse]')"
        ".getAttribute('aria-pressed') === 'false'"
    )
    # The chip's own click still hides the voice (a view setting, separate from mute).
    page.click("#tf-wb .tf-leg[data-voice=Doubt]")
    assert page.get_attribute("#tf-wb .tf-leg[data-voice=Doubt]", "aria-pressed") == "false"
    assert chip_state(page, "Doubt")["muted"] is False


def test_choice_charts_at_each_boundary(page: Any, server: Server, seeded: Any) -> None:
    _, sid = seeded
    reload(page, server, sid)
    got = blocks(page)
    assert [b["voice"] for b in got] == SEED_ORDER
    boxes = page.locator("#tf-wb .tf-msg[data-role=assistant] .tf-choice")
    assert boxes.count() == len(CHOICES)
    # Each chart sits right before the block whose voice it chose.
    before = page.eval_on_selector_all(
        "#tf-wb .tf-msg[data-role=assistant] .tf-choice",
        "bs => bs.map(b => [b.dataset.chosen, b.nextElementSibling.dataset.voice])",
    )
    assert before == [[v, v] for v in SEED_ORDER[: len(CHOICES)]]
    second = boxes.nth(1)
    chart = second.locator(".tf-choice-chart")
    assert chart.is_hidden()
    assert second.locator(".tf-choice-btn").inner_text() == "next: Doubt 60.0% (forced)"
    second.locator(".tf-choice-btn").click()
    assert chart.is_visible()
    rows = chart.locator(".tf-choice-row")
    assert rows.count() == len(CHOICES[1]["probs"])  # one bar per voice
    shown = [
        (
            rows.nth(i).locator(".tf-choice-name").inner_text(),
            rows.nth(i).locator(".tf-choice-val").inner_text(),
        )
        for i in range(rows.count())
    ]
    assert shown == [("Doubt", "60.0%"), ("Pulse", "20.0%"), ("Echo", "5.0%"), (HOSTILE, "1.0%")]
    assert chart.locator(".tf-choice-row.tf-chosen").inner_text().startswith("Doubt")
    # Bars in the voices' legend colours, as wide as their probability.
    bar = page.evaluate(
        """() => {
          const c = document.querySelectorAll('#tf-wb .tf-choice')[1];
          const b = c.querySelector('.tf-choice-row[data-voice=Doubt] .tf-choice-bar');
          const sw = document.querySelector('#tf-wb .tf-leg[data-voice=Doubt] .tf-sw');
          return {w: b.getBoundingClientRect().width,
                  track: b.parentNode.getBoundingClientRect().width,
                  c: getComputedStyle(b).backgroundColor, sw: getComputedStyle(sw).backgroundColor};
        }"""
    )
    assert bar["w"] == pytest.approx(0.6 * bar["track"], abs=1.5) and bar["c"] == bar["sw"]
    assert "forced" in chart.locator(".tf-choice-note").inner_text()
    # The markup-named voice stayed text.
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("#tf-wb .tf-choice img").count() == 0
    second.locator(".tf-choice-btn").click()
    assert chart.is_hidden()
    # Stats: the model's own transition matrix next to the observed one.
    page.click("#tf-wb .tf-viewtab[data-view=stats]")
    model = page.locator("#tf-wb .tf-matrix-model")
    assert page.locator("#tf-wb .tf-matrix-observed").is_visible() and model.is_visible()
    cell = model.locator(".tf-mx-cell[data-from=Echo][data-to=Doubt]")
    assert cell.inner_text() == "0.60"  # after Echo's block the model wanted Doubt at 0.6
    assert model.locator(".tf-mx-cell[data-from=Doubt][data-to=Pulse]").inner_text() == "0.70"


def test_sessions_recorded_by_the_proxy_are_labelled(page: Any, server: Server) -> None:
    sid = session_of(page)
    store = Store(server.db)
    try:
        rec = store.create_session(title="from another app", settings={"recorded": True})
    finally:
        store.close()
    reload(page, server, sid)  # the picker is filled when the page loads
    page.click("#session input")
    opts = page.eval_on_selector_all(
        "ul[role=listbox] li", "xs => xs.map(x => x.textContent.trim())"
    )
    assert any("● Recorded · from another app · 0 msg" in o for o in opts), opts
    assert sum("Recorded" in o for o in opts) == 1
    assert rec


# -- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("ui-steer-model")
    srv = Server(d / "s.db", replay=None, model="embedded-voices", backend="llamacpp", rate=0.0)
    yield srv
    srv.stop()


@pytest.mark.model
def test_next_voice_opens_the_reply_on_the_real_model(browser: Any, model_server: Server) -> None:
    page = open_page(browser, model_server.url)
    sid = new_session(page)
    page.get_by_role("tab", name="Settings").click()
    page.locator("#set-max-tokens input").fill("14")
    page.click("#save-settings")
    page.get_by_text("Settings saved").first.wait_for(timeout=10_000)
    page.get_by_role("tab", name="Workbench").click()
    for i, voice in enumerate(["Shift", "Doubt"]):
        page.click(f"#tf-wb [data-action=next][data-voice={voice}]")
        wait_idle(page)
        assert settings_of(model_server.db, sid)["next_voice"] == voice
        send(page, ["Is the sea blue?", "Should I call my sister?"][i])
        wait_replies(page, i + 1, timeout=120_000)
        got = blocks(page)
        assert got and got[0]["voice"] == voice, got
        # The model's who-speaks-next at the reply's first boundary: one bar per declared
        # voice it could open (the forced one among them), probabilities summing to <= 1.
        box = page.locator("#tf-wb .tf-msg[data-role=assistant]").last.locator(".tf-choice")
        assert box.count() >= 1
        first = box.first
        assert first.get_attribute("data-chosen") == voice
        # Placed live, right before the block it chose.
        nxt = first.evaluate("b => b.nextElementSibling && b.nextElementSibling.dataset.voice")
        assert nxt == voice
        first.locator(".tf-choice-btn").click()
        names = first.locator(".tf-choice-name").all_inner_texts()
        assert voice in names and len(names) == len(set(names)) >= 5
        vals = [float(v.rstrip("%")) for v in first.locator(".tf-choice-val").all_inner_texts()]
        assert sum(vals) <= 100.5 and vals == sorted(vals, reverse=True)
    assert page.errors == []
    page.context.close()
