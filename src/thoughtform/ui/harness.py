"""Drive a real workbench from Python (browser tests, ``bench ui``, screenshots): start
``python -m thoughtform.ui`` on a free loopback port, open it in Chromium through Playwright.

Playwright itself is passed in by the caller, so importing this module stays light."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..procs import die_with_parent

CHROMIUM = os.environ.get("THOUGHTFORM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """The workbench in a child process (killable, restartable on the same database)."""

    def __init__(
        self,
        db: Path,
        replay: Path | None = None,
        model: str | None = "voices.jsonl",
        rate: float = 80.0,
        backend: str | None = None,
        voices: str = "seed",
        port: int | None = None,
        timeout: float = 90.0,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.db = db
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, "-m", "thoughtform.ui", "--db", str(db), "--port", str(self.port)]
        cmd += ["--voices", voices, "--rate", str(rate)]
        if replay is not None:
            cmd += ["--replay", str(replay)]
        if model is not None:
            cmd += ["--model", model]
        if backend is not None:
            cmd += ["--backend", backend]
        cmd += extra or []
        env = {**(os.environ if env is None else env)}
        env.update({"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"})
        self.log = db.with_suffix(f".{self.port}.log")
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                break  # it answers (a login page with auth on)
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"server did not start: {self.log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a crash."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        """Terminate politely."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def launch(pw: Any) -> Any:
    """Chromium through Playwright: the system one (Debian's, or ``$THOUGHTFORM_CHROMIUM``) when
    present, else Playwright's own download."""
    exe = CHROMIUM if Path(CHROMIUM).exists() else None
    return pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)


def login(page: Any, user: str, password: str) -> None:
    """Fill and send Gradio's login form (the page reloads into the workbench)."""
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def open_page(
    browser: Any,
    url: str,
    width: int = 1400,
    height: int = 1000,
    auth: tuple[str, str] | None = None,
) -> Any:
    """A fresh page (in its own browser context) on the workbench, logged in as ``auth`` when
    given, once its renderer shows a session."""
    ctx = browser.new_context(viewport={"width": width, "height": height})
    page = ctx.new_page()
    page.errors = []
    page.dialogs = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))

    def on_dialog(d: Any) -> None:
        page.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(url)
    if auth is not None:
        login(page, *auth)
    page.wait_for_function(
        "() => { const w = document.querySelector('#tf-wb'); return w && w.dataset.session; }",
        timeout=60_000,
    )
    return page


def pick(page: Any, elem_id: str, option: str) -> None:
    """Choose ``option`` in the Gradio dropdown ``#elem_id`` as a person would (open it, click the
    option), then wait until the box shows it: typing and pressing Enter raced the list's filter
    and sometimes kept the old value (seen once in CI)."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_function(
        "([sel, v]) => document.querySelector(sel).value === v",
        arg=[f"#{elem_id} input", option],
        timeout=10_000,
    )


def session_of(page: Any) -> str:
    """The session the page shows."""
    return str(page.evaluate("document.querySelector('#tf-wb').dataset.session"))


def new_session(page: Any) -> str:
    """Click "New session" and wait until the renderer shows it."""
    old = session_of(page)
    page.click("#new-session")
    page.wait_for_function(
        "(old) => document.querySelector('#tf-wb').dataset.session !== old", arg=old, timeout=30_000
    )
    return session_of(page)


def set_max_tokens(page: Any, n: int, db: str | Path, sid: str) -> None:
    """Save "max tokens" in the Settings tab and wait until session ``sid``'s stored settings
    hold it (a full clean-clone run once saved the default: under load a save can be lost to a
    race in the form; it is then made again)."""
    for _ in range(3):
        page.get_by_role("tab", name="Settings").click()
        page.locator("#set-max-tokens input").fill(str(n))
        page.click("#save-settings")
        page.get_by_text("Settings saved").first.wait_for(timeout=10_000)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            con = sqlite3.connect(str(db))
            try:
                row = con.execute("SELECT settings FROM sessions WHERE id=?", (sid,)).fetchone()
            finally:
                con.close()
            if row and json.loads(row[0] or "{}").get("max_tokens") == n:
                page.get_by_role("tab", name="Workbench").click()
                return
            time.sleep(0.1)
    raise AssertionError(f"max tokens {n} never reached session {sid}'s settings")


def send(page: Any, text: str) -> None:
    """Type a message and press Enter."""
    box = page.locator("#prompt textarea")
    box.fill(text)
    box.press("Enter")


def wait_replies(page: Any, n: int, timeout: float = 60_000) -> None:
    """Wait until ``n`` replies have ended (done, stopped or failed)."""
    page.wait_for_function(
        "(n) => document.querySelectorAll("
        "'#tf-wb .tf-msg[data-role=assistant]:not([data-status=streaming])').length >= n",
        arg=n,
        timeout=timeout,
    )


def blocks(page: Any, role: str = "assistant") -> list[dict[str, Any]]:
    """Voice blocks of the last message with ``role``: voice, colour, text."""
    return list(
        page.evaluate(
            """(role) => {
              const ms = document.querySelectorAll(`#tf-wb .tf-msg[data-role=${role}]`);
              const m = ms[ms.length - 1];
              if (!m) return [];
              return Array.from(m.querySelectorAll('.tf-block')).map(b => ({
                voice: b.dataset.voice,
                color: getComputedStyle(b).borderLeftColor,
                text: b.querySelector('.tf-body').innerText,
                visible: b.offsetParent !== null,
              }));
            }""",
            role,
        )
    )
