"""Two people logged in to one workbench, each in their own browser context (real Chromium):
their sessions, streams and attention stay apart, and one waits their turn with their place
shown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thoughtform.ui.harness import Server, open_page, send, session_of, wait_replies

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "ui"
ANN = ("ann", "ann-pass")
BOB = ("bob", "bob-pass")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("ui-users")
    users = d / "users"
    users.write_text(f"{ANN[0]}:{ANN[1]}\n{BOB[0]}:{BOB[1]}\n", encoding="utf-8")
    users.chmod(0o600)
    srv = Server(
        # 10 tokens/s: a reply takes ~7 s, long enough for the other user to queue behind it
        # on a busy machine, with little for the pages to draw.
        d / "s.db",
        replay=FIX,
        model="voices.jsonl",
        rate=10.0,
        extra=["--auth-file", str(users)],
    )
    yield srv
    srv.stop()


def session_labels(page: Any) -> list[str]:
    """The entries of the page's session picker."""
    page.click("#session input")
    opts = page.locator("#session [data-testid=dropdown-option]")
    opts.first.wait_for(timeout=10_000)
    labels = [str(t) for t in opts.all_inner_texts()]
    page.keyboard.press("Escape")
    return labels


def rename(page: Any, title: str) -> None:
    # The picker and name box refresh after a reply: rename once that has happened.
    page.wait_for_function(
        "() => document.querySelector('#session input').value.includes(' 2 msg')",
        timeout=10_000,
    )
    page.locator("#session-title input, #session-title textarea").first.fill(title)
    page.click("#rename")
    page.wait_for_function(
        "(t) => document.querySelector('#session input').value.startsWith(t)",
        arg=title,
        timeout=10_000,
    )


def chat_text(page: Any) -> str:
    return str(page.inner_text("#tf-wb"))


def test_two_users_stay_apart_and_take_turns(browser: Any, server: Server) -> None:
    ann = open_page(browser, server.url, auth=ANN)
    bob = open_page(browser, server.url, auth=BOB)
    assert ann.context is not bob.context
    send(ann, "ann's private thought")
    wait_replies(ann, 1, timeout=60_000)
    rename(ann, "ann-private")
    ann_sid = session_of(ann)
    bob_sid = session_of(bob)
    assert bob_sid != ann_sid
    # Bob's picker lists only his session; Ann's lists only hers.
    assert not any("ann-private" in s for s in session_labels(bob))
    assert any("ann-private" in s for s in session_labels(ann))
    # Ann's session id in Bob's address bar opens Bob's own session.
    bob.goto(server.url + f"?session={ann_sid}")
    bob.wait_for_function(
        "() => { const w = document.querySelector('#tf-wb'); return w && w.dataset.session; }",
        timeout=60_000,
    )
    assert session_of(bob) == bob_sid
    assert "ann's private thought" not in chat_text(bob)
    # Ann's stream and attention, asked for from Bob's page: nothing; from Ann's: there.
    probe = """async ([sid, name]) => {
      const wb = window.thoughtform.current;
      const run = Object.keys(wb.runs)[0] || name;
      return [await wb.server.tf_events(run, 0, 3), await wb.server.tf_attention(sid, 0)];
    }"""
    run_id = ann.evaluate("() => Object.keys(window.thoughtform.current.runs)[0]")
    assert run_id
    ann_events, ann_att = ann.evaluate(probe, [ann_sid, run_id])
    assert len(ann_events) == 3 and ann_att is not None
    bob_events, bob_att = bob.evaluate(
        """async ([sid, run]) => { const wb = window.thoughtform.current;
          return [await wb.server.tf_events(run, 0, 3), await wb.server.tf_attention(sid, 0)]; }""",
        [ann_sid, run_id],
    )
    assert bob_events == [] and bob_att is None

    # The model's queue: Ann's reply streams; Bob's waits and shows his place.
    first = int(ann.evaluate("+document.querySelector('#tf-wb').dataset.tokens"))
    send(ann, "talk for a long time")
    ann.wait_for_function(
        "(n) => +document.querySelector('#tf-wb').dataset.tokens >= n",
        arg=first + 3,
        timeout=30_000,
    )
    send(bob, "my turn?")
    waiting = bob.locator("#tf-wb .tf-msg[data-role=queue]")
    waiting.wait_for(timeout=15_000)
    assert "waiting: 1 ahead" in waiting.inner_text()
    assert "my turn?" in chat_text(bob)
    # Nothing of Ann's reaches Bob's page meanwhile.
    assert "talk for a long time" not in chat_text(bob)
    wait_replies(ann, 2, timeout=60_000)
    wait_replies(bob, 1, timeout=60_000)
    assert bob.locator("#tf-wb .tf-msg[data-role=queue]").count() == 0
    roles = bob.eval_on_selector_all("#tf-wb .tf-msg", "ms => ms.map(m => m.dataset.role)")
    assert roles == ["user", "assistant"]
    assert bob.get_attribute("#tf-wb .tf-msg[data-role=assistant]", "data-status") == "done"
    # With a login, a typed server path (the sessions database, say) is refused.
    ann.get_by_role("tab", name="Dataset").click()
    ann.locator("#ds-path input, #ds-path textarea").first.fill(str(server.db))
    ann.click("#ds-open")
    ann.get_by_text("server paths only on loopback without a login").first.wait_for(timeout=10_000)
    assert ann.errors == [] and bob.errors == []
    ann.context.close()
    bob.context.close()
