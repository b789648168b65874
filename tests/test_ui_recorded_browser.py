"""`thoughtform serve --db` on the file `thoughtform proxy` records into: the Recorded filter
and a recorded reply that grows on the page while the other process writes it (real Chromium)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thoughtform.trace import TokenRecord
from thoughtform.ui.harness import Server, launch, open_page
from thoughtform.ui.store import Store

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "ui"


def test_recorded_sessions_filter_and_stream_live(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store(db)  # what the proxy does in its own process
    store.create_session("an ordinary one", settings={"backend": "replay"})
    sid = store.create_session("proxy · sea", settings={"recorded": True, "source": "proxy"})
    store.add_message(sid, "user", "Is the sea blue?")
    reply = store.add_message(sid, "assistant", None, status="streaming")
    store.append_tokens(reply.id, [TokenRecord(0, "[Echo]\n"), TokenRecord(1, "The sea")])
    srv = Server(db, replay=FIX, model="voices.jsonl")
    try:
        with playwright.sync_playwright() as pw:
            br = launch(pw)
            page = open_page(br, srv.url)
            page.click("#recorded-only input")
            page.click("#session input")
            labels = page.eval_on_selector_all(
                "ul[role=listbox] li", "els => els.map(e => e.textContent)"
            )
            assert len(labels) == 1 and "Recorded" in labels[0] and "sea" in labels[0], labels
            page.keyboard.press("Escape")
            page.goto(f"{srv.url}?session={sid}")
            page.wait_for_function(
                "(sid) => document.querySelector('#tf-wb')?.dataset.session === sid",
                arg=sid,
                timeout=60_000,
            )
            page.wait_for_selector("#tf-wb .tf-block[data-voice=Echo]", timeout=30_000)
            # The proxy writes more of the reply: the open page shows it within a few polls.
            store.append_tokens(reply.id, [TokenRecord(2, " is grey\n\n[Doubt]\nIs it?")])
            page.wait_for_selector("#tf-wb .tf-block[data-voice=Doubt]", timeout=20_000)
            assert "is grey" in page.inner_text("#tf-wb")
            store.finish_message(reply.id, "done", {"reason": "stop"})
            page.wait_for_function(
                "() => document.querySelector('#tf-wb .tf-msg[data-role=assistant]')"
                "?.dataset.status === 'done'",
                timeout=20_000,
            )
            assert page.errors == [], page.errors
            br.close()
    finally:
        srv.stop()
        store.close()
