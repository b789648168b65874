"""Playwright helpers for tests that drive the real Debian Chromium (import the fixtures:
``from browser import tf_browser, tf_page  # noqa: F401``).

``tf_page`` records what a hostile page might try: dialogs (auto-dismissed), page errors,
console errors (CSP violations land there), and every network request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("TF_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@dataclass
class PageLog:
    """What happened on a page while a test drove it."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def tf_browser() -> Iterator[Browser]:
    """One headless Chromium per test module."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set TF_CHROMIUM)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def tf_page(tf_browser: Browser) -> Iterator[tuple[Page, PageLog]]:
    """A fresh page in its own context, with a :class:`PageLog` of dialogs, errors, requests."""
    ctx = tf_browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    log = PageLog()

    def on_dialog(d):  # type: ignore[no-untyped-def]
        log.dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda e: log.errors.append(str(e)))
    page.on(
        "console",
        lambda m: log.console_errors.append(m.text) if m.type == "error" else None,
    )
    page.on("request", lambda r: log.requests.append(r.url))
    try:
        yield page, log
    finally:
        ctx.close()


DOM_AUDIT_JS = """() => {
  const out = {on: [], style: [], tags: {}, fixed: []};
  for (const el of document.querySelectorAll('*')) {
    const tag = el.tagName.toLowerCase();
    out.tags[tag] = (out.tags[tag] || 0) + 1;
    for (const a of el.attributes) {
      const n = a.name.toLowerCase();
      if (n.startsWith('on')) out.on.push(tag + '[' + n + ']');
      if (n === 'style') out.style.push(tag);
      if (/^\\s*(javascript|vbscript|data):/i.test(a.value) && n !== 'content')
        out.on.push(tag + '[' + n + '=' + a.value.slice(0, 40) + ']');
    }
    if (getComputedStyle(el).position === 'fixed') out.fixed.push(tag);
  }
  return out;
}"""
"""JS for ``page.evaluate``: on*/javascript: attributes, style attributes, tag counts, and
elements with ``position: fixed`` anywhere in the DOM."""
