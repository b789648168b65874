"""``serve`` options: login from a flag, a file or the environment; replays that play whole;
the default Max tokens of new sessions."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from thoughtform.cli import main
from thoughtform.ui.config import (
    AUTH_ENV,
    ConfigError,
    ServeConfig,
    auth_file_warning,
    auth_users,
    resolve_auth,
)
from thoughtform.ui.service import Tab, Workbench


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    err = io.StringIO()
    code = main(argv, stderr=err)
    out = capsys.readouterr()
    return code, out.out, err.getvalue() + out.err


def test_auth_from_flag_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "users"
    f.write_text("# team\nann:pw:with:colons\n\n  bob : secret \n", encoding="utf-8")
    assert resolve_auth(None, str(f), env={}) == [("ann", "pw:with:colons"), ("bob", "secret")]
    assert resolve_auth("cy:x", None, env={AUTH_ENV: "env:y"}) == [("cy", "x")]
    assert resolve_auth(None, None, env={AUTH_ENV: "env:y"}) == [("env", "y")]
    assert resolve_auth(None, None, env={}) is None
    # The flag and the file together; the environment only when neither is given.
    got = resolve_auth("cy:x", str(f), env={AUTH_ENV: "env:y"})
    assert [u for u, _ in got or []] == ["cy", "ann", "bob"]
    with pytest.raises(ConfigError, match=r"user 'ann' is given twice"):
        resolve_auth("ann:x", str(f), env={})
    bad = tmp_path / "bad"
    bad.write_text("ann:ok\nno-password-here\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad: line 2: expected USER:PASS"):
        resolve_auth(None, str(bad), env={})
    with pytest.raises(ConfigError, match=r"THOUGHTFORM_AUTH: expected USER:PASS"):
        resolve_auth(None, None, env={AUTH_ENV: "nobody"})
    with pytest.raises(ConfigError, match="auth file not found"):
        resolve_auth(None, str(tmp_path / "missing"), env={})
    assert auth_users(ServeConfig(auth=("a", "b"))) == [("a", "b")]
    assert auth_users(ServeConfig(auth=[("a", "b"), ("c", "d")])) == [("a", "b"), ("c", "d")]
    os.chmod(f, 0o644)
    assert "readable by other users" in (auth_file_warning(f) or "")
    os.chmod(f, 0o600)
    assert auth_file_warning(f) is None


def test_serve_cli_login_and_max_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import thoughtform.ui.app as app

    seen: list[ServeConfig] = []
    monkeypatch.setattr(app, "serve", seen.append)
    monkeypatch.delenv(AUTH_ENV, raising=False)
    f = tmp_path / "users"
    f.write_text("ann:a\nbob:b\n", encoding="utf-8")
    f.chmod(0o600)
    code, _, err = run(["serve", "--auth-file", str(f), "--max-tokens", "4000"], capsys)
    assert code == 0, err
    assert seen[-1].auth == [("ann", "a"), ("bob", "b")] and seen[-1].max_tokens == 4000
    monkeypatch.setenv(AUTH_ENV, "eve:from-env")
    assert run(["serve", "--host", "0.0.0.0"], capsys)[0] == 0  # a login, so allowed
    assert seen[-1].auth == [("eve", "from-env")]
    monkeypatch.delenv(AUTH_ENV)
    code, _, err = run(["serve", "--auth-file", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.strip().endswith("nope: auth file not found")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(["serve", "--auth", "ann"], capsys)
    assert code == 2 and "--auth: expected USER:PASS" in err
    code, _, err = run(["serve", "--max-tokens", "0"], capsys)
    assert code == 2 and "--max-tokens" in err
    code, _, err = run(["serve", "--host", "0.0.0.0"], capsys)
    assert code == 2 and "not loopback" in err and "--auth-file" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    helptext = capsys.readouterr().out
    assert "shows in `ps`" in " ".join(helptext.split())


def long_transcript(path: Path, chars: int = 20_000) -> str:
    words = []
    n = 0
    i = 0
    while n < chars:
        w = f"word{i}"
        words.append(w)
        n += len(w) + 1
        i += 1
    text = "[Echo]\n" + " ".join(words) + "\n\n[Doubt]\nthe end."
    path.write_text(text, encoding="utf-8")
    return text


def test_replay_plays_whole_whatever_max_tokens(tmp_path: Path) -> None:
    rec = tmp_path / "long.txt"
    text = long_transcript(rec)
    # As `serve --replay FILE` starts it: the default backend, the replay wins.
    cfg = ServeConfig(backend="llamacpp", replay=str(rec), db=str(tmp_path / "s.db"))
    wb = Workbench(cfg)
    _, tab = wb.reset_payload(None)
    assert wb.settings_of(wb.session_info(tab.sid))["max_tokens"] == 256
    last = None
    for pl, _ in wb.send(tab, "play it"):
        last = json.loads(pl)
    assert last is not None
    reply = wb.store.messages(tab.sid or "")[-1]
    assert reply.status == "done" and reply.text == text
    assert len(reply.tokens) > 1000  # far past the session's 256
    wb.close()


def test_max_tokens_sets_the_default_of_new_sessions(tmp_path: Path) -> None:
    cfg = ServeConfig(backend="replay", replay=str(tmp_path / "x.txt"), max_tokens=1234)
    cfg.db = str(tmp_path / "s.db")
    wb = Workbench(cfg)
    info = wb.new_session()
    assert info.settings["max_tokens"] == 1234
    assert wb.clean_settings({})["max_tokens"] == 1234  # a field left empty keeps the default
    assert wb.clean_settings({"max_tokens": 50})["max_tokens"] == 50
    _, tab = wb.reset_payload(None)
    assert isinstance(tab, Tab)
    wb.close()
