"""The loom in real Chromium: a reply's branches (← k/n →, Alt+Left/Right, tree map, compare
lanes) on a replay server with a seeded database whose branch and alternatives are hostile
text; and branching from an alternative on the real embedded voices model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from thoughtform.trace import Alternative, TokenRecord, load_trace
from thoughtform.ui.harness import (
    Server,
    new_session,
    open_page,
    send,
    set_max_tokens,
    wait_replies,
)
from thoughtform.ui.store import Store

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.sync_api")

FIX = Path(__file__).parent / "fixtures" / "ui"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
AT = 3  # the fork: token " You" of the fixture reply


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int, int]:
    """One session: a stored reply (a hostile alternative at the fork) and one branch of it
    whose text is markup."""
    d = tmp_path_factory.mktemp("ui-loom")
    db = d / "s.db"
    trace = load_trace(FIX / "voices.jsonl")
    toks = [dataclasses.replace(t) for t in trace.tokens]
    toks[AT] = dataclasses.replace(
        toks[AT], top=[*toks[AT].top[:4], Alternative(HOSTILE, -4.0, 4242)]
    )
    store = Store(db)
    sid = store.create_session(title="loom", settings={"backend": "replay"})
    store.add_message(sid, "user", "Will the rain stop?")
    root = store.add_message(sid, "assistant", None, status="streaming")
    store.append_tokens(root.id, toks)
    # One who-speaks-next record at the fork, one of whose voice names is markup.
    choice = {"token": AT, "probs": {"Doubt": 0.3, HOSTILE: 0.1}, "chosen": "Doubt"}
    finish = {"reason": "stop", "voice_choices": [choice]}
    store.finish_message(root.id, "done", finish, "".join(t.text for t in toks))
    kid_toks = [
        *toks[:AT],
        TokenRecord(index=AT, text=HOSTILE, token_id=4242, logprob=-4.0, forced=True),
        TokenRecord(index=AT + 1, text=" and then\n\n[Doubt]\n" + HOSTILE, token_id=5, logprob=-1),
    ]
    kid = store.add_message(sid, "assistant", None, status="streaming")
    store.append_tokens(kid.id, kid_toks)
    store.finish_message(kid.id, "done", {"reason": "stop"}, "".join(t.text for t in kid_toks))
    store.add_branch(sid, root.id, {"at": AT, "token_id": 4242}, {"seed": 2}, kid.id)
    store.close()
    return db, sid, root.id, kid.id


def loom_idle(page: Any) -> None:
    page.wait_for_function(
        "() => !document.querySelector('#tf-wb').dataset.loomBusy", timeout=120_000
    )


def pos(page: Any, mid: int) -> str:
    return str(page.text_content(f"#tf-wb .tf-chat .tf-msg[data-msg='{mid}'] .tf-loom-pos"))


def no_markup(page: Any) -> None:
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#tf-wb img").count() == 0


def test_siblings_tree_and_compare_render_hostile_text_as_text(
    browser: Any, seeded: tuple[Path, str, int, int]
) -> None:
    db, sid, root, kid = seeded
    srv = Server(db, replay=FIX, model="voices.jsonl", rate=200.0, timeout=240)
    try:
        page = open_page(browser, f"{srv.url}?session={sid}")
        msg = f"#tf-wb .tf-chat .tf-msg[data-msg='{root}']"
        page.wait_for_selector(f"{msg} .tf-loom-pos", timeout=30_000)
        assert pos(page, root) == "1/2"
        assert page.locator(f"{msg} .tf-loom-alt").count() == 0
        page.click(f"{msg} [data-action=loom-next]")
        assert pos(page, root) == "2/2"
        alt = page.locator(f"{msg} .tf-loom-alt")
        assert HOSTILE in str(alt.text_content()) and alt.get_attribute("data-msg") == str(kid)
        assert page.locator(f"{msg} .tf-loom-alt .tf-loom-block").count() == 2
        # The original's blocks are hidden while the branch is shown.
        assert not page.locator(f"{msg} .tf-block").first.is_visible()
        # Keyboard: Alt+Left / Alt+Right on the focused message.
        page.focus(msg)
        page.keyboard.press("Alt+ArrowLeft")
        assert pos(page, root) == "1/2" and page.locator(f"{msg} .tf-block").first.is_visible()
        page.keyboard.press("Alt+ArrowRight")
        assert pos(page, root) == "2/2"
        # The tree map: the original and its branch, the shown one marked.
        page.click(f"{msg} [data-action=loom-tree]")
        nodes = page.locator(f"{msg} .tf-loom-go")
        assert nodes.count() == 2
        assert nodes.nth(1).get_attribute("aria-current") == "true"
        assert "@3 token 4242" in str(nodes.nth(1).text_content())
        nodes.nth(0).click()
        assert pos(page, root) == "1/2"
        nodes.nth(1).click()
        # Compare: two lanes from the fork, the comparison as text.
        page.click(f"{msg} [data-action=loom-compare]")
        page.wait_for_selector(f"{msg} .tf-loom-cmp .tf-loom-lane[data-lane=B]", timeout=30_000)
        summary = str(page.text_content(f"{msg} .tf-loom-summary"))
        assert "fork at token 3" in summary and "vanished: Pulse, Glimmer, Shift" in summary
        assert "re-converge" in summary
        lane_b = str(page.text_content(f"{msg} .tf-loom-lane[data-lane=B]"))
        assert HOSTILE in lane_b and "Echo" in lane_b
        assert page.text_content(f"{msg} .tf-loom-lane[data-lane=A] .tf-loom-prefix") == "… [Echo]"
        # "Let another voice speak here" at the boundary: the voices with their probabilities.
        page.click(f"{msg} [data-action=loom-prev]")
        page.click(f"{msg} .tf-choice-btn")
        vb = page.locator(f"{msg} .tf-loom-voices [data-action=branch-voice]")
        assert [vb.nth(i).text_content() for i in range(vb.count())] == [
            "Doubt 30.0%",
            HOSTILE + " 10.0%",
        ]
        vb.nth(1).click()
        loom_idle(page)
        note = str(page.text_content(f"{msg} .tf-loom-voices .tf-loom-note"))
        assert note.startswith("branch failed:")
        # The alternatives popover: "branch here" on every row, the hostile one shown as text.
        page.click("#tf-wb .tf-viewtab[data-view=tokens]")
        page.click(f"#tf-wb .tf-tokmsg[data-msg='{root}'] .tf-tok >> nth={AT}")
        rows = page.locator("#tf-wb .tf-pop tr.tf-alt")
        assert rows.count() == 5
        assert page.locator("#tf-wb .tf-pop [data-action=branch]").count() == 5
        assert HOSTILE in str(page.text_content("#tf-wb .tf-pop"))
        # The replay backend cannot continue from token ids: a one-line refusal, as text.
        page.locator("#tf-wb .tf-pop [data-action=branch]").last.click()
        loom_idle(page)
        note = str(page.text_content("#tf-wb .tf-pop .tf-loom-note"))
        assert note.startswith("branch failed:") and "llamacpp" in note
        no_markup(page)
        assert page.errors == [], page.errors
        page.context.close()
    finally:
        srv.stop()


@pytest.mark.model
def test_branch_from_an_alternative_on_the_real_model(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("ui-loom-model")
    srv = Server(
        d / "s.db", replay=None, model="embedded-voices", backend="llamacpp", rate=0.0, timeout=240
    )
    try:
        page = open_page(browser, srv.url)
        sid = new_session(page)
        set_max_tokens(page, 20, srv.db, sid)
        send(page, "Is the sea blue?")
        wait_replies(page, 1, timeout=120_000)
        mid = int(
            page.get_attribute("#tf-wb .tf-chat .tf-msg[data-role=assistant]", "data-msg") or -1
        )
        page.click("#tf-wb .tf-viewtab[data-view=tokens]")
        page.click(f"#tf-wb .tf-tokmsg[data-msg='{mid}'] .tf-tok >> nth=4")
        assert page.locator("#tf-wb .tf-pop [data-action=branch]").count() == 5
        # An alternative the reply did not take (the reply is sampled: the chosen token is not
        # always the most likely row, so "the second row" is sometimes the chosen one itself).
        others = page.locator("#tf-wb .tf-pop tr.tf-alt:not(.tf-chosen) [data-action=branch]")
        assert others.count() >= 4
        others.first.click()
        loom_idle(page)
        assert page.evaluate("document.querySelector('#tf-wb').dataset.loomError") is None
        page.click("#tf-wb .tf-viewtab[data-view=chat]")
        msg = f"#tf-wb .tf-chat .tf-msg[data-msg='{mid}']"
        page.wait_for_selector(f"{msg} .tf-loom-pos", timeout=30_000)
        assert pos(page, mid) == "2/2"  # the new branch is shown
        assert page.locator(f"{msg} .tf-loom-alt .tf-loom-block").count() >= 1
        page.click(f"{msg} [data-action=loom-compare]")
        page.wait_for_selector(f"{msg} .tf-loom-lane[data-lane=B]", timeout=30_000)
        assert "fork at token 4" in str(page.text_content(f"{msg} .tf-loom-summary"))
        assert page.locator(f"{msg} .tf-loom-lane").count() == 2
        page.click(f"{msg} [data-action=loom-close]")
        page.click(f"{msg} [data-action=loom-prev]")
        assert pos(page, mid) == "1/2"
        # A voice boundary: let another voice speak there (its who-speaks-next probability shown).
        choice = page.locator(f"{msg} .tf-choice").first
        choice.locator(".tf-choice-btn").click()
        voice_btn = choice.locator(".tf-loom-voices [data-action=branch-voice]").last
        voice = str(voice_btn.get_attribute("data-voice"))
        assert voice and "%" in str(voice_btn.text_content())
        voice_btn.click()
        loom_idle(page)
        assert page.evaluate("document.querySelector('#tf-wb').dataset.loomError") is None
        assert pos(page, mid) == "3/3"
        assert voice in [
            b.get_attribute("data-voice")
            for b in page.locator(f"{msg} .tf-loom-alt .tf-loom-block").all()
        ]
        page.focus(msg)
        page.keyboard.press("Alt+ArrowRight")
        assert pos(page, mid) == "1/3"
        page.keyboard.press("Alt+ArrowLeft")
        assert pos(page, mid) == "3/3"
        # A reload still shows the branches (the tree is in the database).
        page.goto(srv.url)
        page.wait_for_selector(f"{msg} .tf-loom-pos", timeout=60_000)
        assert pos(page, mid) == "1/3"
        assert page.errors == [], page.errors
        page.context.close()
    finally:
        srv.stop()
