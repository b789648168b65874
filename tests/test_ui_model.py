"""End to end with the real embedded model: llama.cpp in the server, Chromium in front."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator

import pytest

from thoughtform.ui.harness import (
    Server,
    launch,
    new_session,
    open_page,
    send,
    set_max_tokens,
    wait_replies,
)

pytestmark = [pytest.mark.browser, pytest.mark.model]
playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("ui-model")
    srv = Server(d / "s.db", replay=None, model=None, backend="llamacpp", rate=0.0)
    yield srv
    srv.stop()


def test_real_model_streams_tokens_with_telemetry_and_stops(server: Server) -> None:
    with playwright.sync_playwright() as pw:
        br = launch(pw)
        page = open_page(br, server.url)
        sid = new_session(page)
        set_max_tokens(page, 24, server.db, sid)
        send(page, "Say hello to the rain.")
        wait_replies(page, 1, timeout=120_000)
        status = page.get_attribute("#tf-wb .tf-msg[data-role=assistant]", "data-status")
        assert status == "done"
        shown = int(page.evaluate("document.querySelector('#tf-wb').dataset.tokens"))
        con = sqlite3.connect(server.db)
        (stored,) = con.execute(
            "SELECT COUNT(*) FROM tokens t JOIN messages m ON m.id=t.message_id WHERE m.session_id=?",
            (sid,),
        ).fetchone()
        assert 1 <= shown == stored <= 24
        # Real telemetry reaches the popover: 5 alternatives, probabilities descending, sum <= 1.
        page.click("#tf-wb .tf-viewtab[data-view=tokens]")
        page.locator("#tf-wb .tf-tok[data-token-index='0']").hover()
        ps = page.eval_on_selector_all(
            "#tf-wb .tf-pop .tf-alt-p", "xs => xs.map(x => parseFloat(x.textContent))"
        )
        assert len(ps) == 5 and ps == sorted(ps, reverse=True) and sum(ps) <= 100.5
        assert not any(math.isnan(p) for p in ps)
        # Stop a long reply: it ends at once, keeps its tokens, and the model is free again.
        page.click("#tf-wb .tf-viewtab[data-view=chat]")
        set_max_tokens(page, 400, server.db, sid)
        send(page, "Tell me a long story about the sea.")
        page.wait_for_function(
            "(n) => +document.querySelector('#tf-wb').dataset.tokens >= n + 3",
            arg=shown,
            timeout=60_000,
        )
        t0 = time.monotonic()
        page.click("#stop")
        wait_replies(page, 2, timeout=10_000)
        assert time.monotonic() - t0 < 3
        last = page.locator("#tf-wb .tf-msg[data-role=assistant]").last
        assert last.get_attribute("data-status") == "cancelled"
        set_max_tokens(page, 8, server.db, sid)
        send(page, "One word?")
        wait_replies(page, 3, timeout=60_000)
        assert (
            page.locator("#tf-wb .tf-msg[data-role=assistant]").last.get_attribute("data-status")
            == "done"
        )
        assert page.errors == []
        br.close()
