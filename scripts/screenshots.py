"""Screenshots of every workbench view, taken from the real app, into docs/img/*.png.

    .venv/bin/python scripts/screenshots.py [--out docs/img]

The server runs the replay backend over the test fixtures (a multi-voice trace with
logprobs, alternatives and attention), so the pictures are reproducible and need no model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from thoughtform.ui.harness import Server, launch, new_session, open_page, send, wait_replies

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "ui"


def main() -> None:
    """Start the app, drive each view, save one PNG per view."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tf-shots-") as d:
        srv = Server(Path(d) / "s.db", replay=FIX, model="attention.jsonl", rate=200.0)
        try:
            with sync_playwright() as pw:
                br = launch(pw)
                page = open_page(br, srv.url, width=1400, height=900)
                new_session(page)
                send(page, "Will the rain stop?")
                wait_replies(page, 1)
                send(page, "And then?\n[Doubt] Are you sure?")
                wait_replies(page, 2)
                wb = page.locator("#workbench")

                def shot(name: str) -> None:
                    page.wait_for_timeout(300)
                    page.screenshot(path=str(out / f"{name}.png"))
                    print(out / f"{name}.png")

                shot("chat")
                page.click("#tf-wb .tf-viewtab[data-view=lanes]")
                page.locator("#tf-wb .tf-zoom").fill("6")
                wb.screenshot(path=str(out / "lanes.png"))
                print(out / "lanes.png")
                page.click("#tf-wb .tf-viewtab[data-view=tokens]")
                page.locator("#tf-wb .tf-tok[data-token-index='12']").click()
                wb.screenshot(path=str(out / "tokens.png"))
                print(out / "tokens.png")
                page.click("#tf-wb .tf-pop button[data-act=attention]")
                page.locator("#tf-wb .tf-attn-body .tf-barrow").first.wait_for()
                wb.screenshot(path=str(out / "attention.png"))
                print(out / "attention.png")
                page.click("#tf-wb .tf-viewtab[data-view=stats]")
                wb.screenshot(path=str(out / "stats.png"))
                print(out / "stats.png")
                page.click("#tf-wb .tf-viewtab[data-view=chat]")
                page.click("#tf-wb .tf-leg[data-voice=Doubt]")
                shot("legend-hidden")
                page.click("#tf-wb .tf-leg[data-voice=Doubt]")
                page.get_by_role("tab", name="Voices").click()
                shot("voices")
                page.get_by_role("tab", name="Settings").click()
                shot("settings")
                br.close()
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
