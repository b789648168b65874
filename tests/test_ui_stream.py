"""The workbench without a browser: streaming payloads, persistence while streaming, stop,
gap fetches, reset == live, colours, export/import, attention, exposure rules."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from thoughtform.trace import load_trace
from thoughtform.ui.colors import VoiceColors, safe_hex
from thoughtform.ui.config import ConfigError, ServeConfig, check_exposure, is_loopback
from thoughtform.ui.export import import_file, reply_trace, safe_filename, session_markdown
from thoughtform.ui.service import Tab, Workbench
from thoughtform.voices import PALETTE, PRESETS

FIX = Path(__file__).parent / "fixtures" / "ui"


def make_wb(tmp_path: Path, replay: str = "voices.jsonl", rate: float = 0.0) -> Workbench:
    cfg = ServeConfig(
        backend="replay", replay=str(FIX / replay), db=str(tmp_path / "s.db"), replay_rate=rate
    )
    return Workbench(cfg)


def collect(wb: Workbench, tab: Tab, text: str) -> tuple[list[dict[str, Any]], Tab]:
    out = []
    last = tab
    for pl, t in wb.send(tab, text):
        out.append(json.loads(pl))
        last = t
    return out, last


def flat(payloads: list[dict[str, Any]]) -> list[list[Any]]:
    return [e for p in payloads for e in p["ev"]]


def reply_events(evs: list[list[Any]], role: str = "assistant") -> list[list[Any]]:
    """Events of the last message with ``role`` (from its M to the next M or the end)."""
    starts = [i for i, e in enumerate(evs) if e[0] == "M" and e[2] == role]
    i = starts[-1]
    j = next((k for k in range(i + 1, len(evs)) if evs[k][0] == "M"), len(evs))
    return [e for e in evs[i:j] if e[0] != "S"]


def test_send_streams_blocks_tokens_and_stats(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None)
    payloads, tab2 = collect(wb, tab, "Will it rain?\n[Doubt] I wonder.")
    evs = flat(payloads)
    # Run payloads carry a contiguous log: from == sum of the previous lengths.
    pos = 0
    for p in payloads:
        assert p["run"] and p["from"] == pos
        pos += len(p["ev"])
    user = reply_events(evs, "user")
    assert [e[1] for e in user if e[0] == "O"] == ["main", "Doubt"]
    rep = reply_events(evs)
    assert [e[1] for e in rep if e[0] == "O" and e[3]] == [
        "Echo",
        "Doubt",
        "Pulse",
        "Glimmer",
        "Shift",
    ]
    ks = [e for e in rep if e[0] == "K"]
    trace = load_trace(FIX / "voices.jsonl")
    assert [k[1] for k in ks] == list(range(len(trace.tokens)))
    assert "".join(k[2] for k in ks) == trace.text
    assert all(len(k[6]) == 5 for k in ks)
    assert rep[-1][:2] == ["E", "done"]
    colors = {e[1]: e[2] for e in rep if e[0] == "O"}
    assert len(set(colors.values())) == len(colors)  # every voice its own colour
    assert colors["Glimmer"] not in PALETTE  # the unknown voice does not reuse a seed colour
    stats = evs[-1]
    assert stats[0] == "S" and sum(r[1] for r in stats[1]) == len(trace.tokens)
    order, matrix = stats[2]
    assert order[:2] == ["Echo", "Doubt"] and matrix[0][1] == 1
    assert tab2.known == 2
    msgs = wb.store.messages(tab.sid or "")
    assert msgs[1].status == "done" and msgs[1].text == trace.text
    assert len(msgs[1].tokens) == len(trace.tokens)
    wb.close()


def test_reset_replays_exactly_what_streamed(tmp_path: Path) -> None:
    """Reopening a session rebuilds the same blocks, text pieces and token events."""
    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None)
    live, tab = collect(wb, tab, "first")
    live2, tab = collect(wb, tab, "second")
    pl, _ = wb.reset_payload(tab.sid)
    reset = json.loads(pl)["ev"]
    assert reset[0] == ["R"]
    live_msgs = [e for e in flat(live) + flat(live2) if e[0] in "MOTCKE"]
    reset_msgs = [e for e in reset if e[0] in "MOTCKE"]
    # Status of the assistant M differs (streaming live, done on reload); the rest is identical.
    norm = lambda evs: [e[:3] if e[0] in "ME" else e for e in evs]  # noqa: E731
    assert norm(reset_msgs) == norm(live_msgs)
    # Global token indices continue across replies.
    ks = [e[1] for e in reset if e[0] == "K"]
    assert ks == list(range(len(ks)))
    wb.close()


def test_tokens_are_saved_while_streaming(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, rate=60.0)
    _, tab = wb.reset_payload(None)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            msgs = wb.store.messages(tab.sid or "")
            if len(msgs) == 2 and msgs[1].status == "streaming":
                seen.append(len(msgs[1].tokens))
            time.sleep(0.05)

    th = threading.Thread(target=watch)
    th.start()
    collect(wb, tab, "go")
    done.set()
    th.join()
    total = len(load_trace(FIX / "voices.jsonl").tokens)
    partial = [n for n in seen if 0 < n < total]
    assert len(set(partial)) >= 3, seen  # rows arrived in several batches before the end
    wb.close()


def test_stop_ends_reply_at_once_and_keeps_it(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, rate=40.0)
    _, tab = wb.reset_payload(None)
    gen = wb.send(tab, "go")
    payloads = []
    for pl, _ in gen:
        payloads.append(json.loads(pl))
        if sum(1 for e in flat(payloads) if e[0] == "K") >= 5:
            break
    t0 = time.perf_counter()
    assert wb.stop(tab.sid)
    for pl, _ in gen:
        payloads.append(json.loads(pl))
    assert time.perf_counter() - t0 < 0.5
    evs = flat(payloads)
    end = [e for e in evs if e[0] == "E"]
    assert end[-1][1] == "cancelled"
    msgs = wb.store.messages(tab.sid or "")
    assert msgs[1].status == "cancelled"
    n = len(msgs[1].tokens)
    assert 5 <= n < len(load_trace(FIX / "voices.jsonl").tokens)
    assert not wb.stop(tab.sid)  # nothing left to stop; the backend is free again
    again, _ = collect(wb, Tab(tab.sid, 2), "again")
    assert (
        reply_events(flat(again))[-1][1] == "cancelled"
        or reply_events(flat(again))[-1][1] == "done"
    )
    wb.close()


def test_closing_the_stream_cancels_the_run(tmp_path: Path) -> None:
    """A tab that goes away (Gradio closes the generator) stops the reply and frees the backend."""
    wb = make_wb(tmp_path, rate=40.0)
    _, tab = wb.reset_payload(None)
    gen = wb.send(tab, "go")
    next(gen)
    next(gen)
    gen.close()
    msgs = wb.store.messages(tab.sid or "")
    assert msgs[1].status == "cancelled"
    assert not wb.active
    wb.close()


def test_gap_fetch_returns_the_missing_events(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None)
    payloads, _ = collect(wb, tab, "go")
    run = payloads[0]["run"]
    a = payloads[1]["from"] if len(payloads) > 1 else 0
    b = payloads[-1]["from"]
    assert wb.run_events(run, a, b) == flat(payloads)[a:b]
    assert wb.run_events("no-such-run", 0, 5) == []
    wb.close()


def test_stale_tab_gets_a_reset_first(tmp_path: Path) -> None:
    """A second tab on the same session that missed messages is brought up to date."""
    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None)
    collect(wb, tab, "from tab one")
    stale = Tab(tab.sid, 0)
    payloads, t = collect(wb, stale, "from tab two")
    evs = flat(payloads)
    assert evs[0] == ["R"]
    users = [e for e in evs if e[0] == "M" and e[2] == "user"]
    assert len(users) == 2 and t.known == 4
    wb.close()


def test_unknown_voices_get_distinct_colours() -> None:
    vc = VoiceColors(PRESETS["seed"])
    names = [f"Voice{i}" for i in range(30)]
    cols = [vc.color(n) for n in names]
    declared = {v.color.upper() for v in PRESETS["seed"].voices}
    assert len(set(cols)) == 30 and not (set(cols) & declared)
    assert all(safe_hex(c) == c for c in cols)
    assert vc.color("voice3") == cols[3]  # case-insensitive, stable
    assert vc.color("Echo") == PRESETS["seed"].color_of("Echo")
    assert safe_hex("red; background:url(x)") == "#777777"


def test_exposure_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert check_exposure(ServeConfig()) is None
    with pytest.raises(ConfigError):
        check_exposure(ServeConfig(host="0.0.0.0"))
    assert check_exposure(ServeConfig(host="0.0.0.0", auth=("u", "p"))) is None
    warn = check_exposure(ServeConfig(host="0.0.0.0", insecure=True))
    assert warn and "WARNING" in warn
    with pytest.raises(ConfigError):
        check_exposure(ServeConfig(host="0.0.0.0", auth=("u", "")))


def test_export_and_import_round_trip(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None)
    collect(wb, tab, "go")
    info = wb.store.get_session(tab.sid or "")
    assert info is not None
    msgs = wb.store.messages(info.id)
    tr = reply_trace(info, msgs, 0, wb.voices_of(info))
    assert tr is not None
    out = tmp_path / "r.jsonl"
    tr.save(out)
    back = load_trace(out)
    assert back.text == load_trace(FIX / "voices.jsonl").text
    assert [s.voice for s in back.segments if s.text] == [
        "Echo",
        "Doubt",
        "Pulse",
        "Glimmer",
        "Shift",
    ]
    assert back.meta["messages"] == [{"role": "user", "content": "go"}]
    sid2, warns = import_file(wb.store, out, wb.default_settings())
    assert not warns
    m2 = wb.store.messages(sid2)
    assert [m.role for m in m2] == ["user", "assistant"]
    assert [t.text for t in m2[1].tokens] == [t.text for t in back.tokens]
    # A plain transcript becomes one reply.
    sid3, _ = import_file(wb.store, FIX / "hostile.txt", wb.default_settings())
    assert wb.store.messages(sid3)[0].text == (FIX / "hostile.txt").read_text(encoding="utf-8")
    wb.close()


def test_markdown_export_neutralises_markup(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    sid, _ = import_file(wb.store, FIX / "hostile.txt", wb.default_settings())
    wb.store.update_session(sid, title="<img src=x onerror=alert(1)> [x](javascript:alert(1))")
    info = wb.store.get_session(sid)
    assert info is not None
    md = session_markdown(info, wb.store.messages(sid), wb.voices_of(info))
    # Outside fences nothing can be a tag or a link; inside, fences cannot be closed early.
    outside = []
    fence = None
    for line in md.splitlines():
        if fence is None and line.startswith("~~~~"):
            fence = line.removesuffix("text")
            continue
        if fence is not None:
            if line == fence:
                fence = None
            continue
        outside.append(line)
    assert fence is None
    joined = "\n".join(outside)
    assert "<" not in joined and "](" not in joined
    assert "window.__pwned=1" in md  # the text is kept, inside a fence
    assert safe_filename("../../etc/passwd", ".md") == "etc-passwd.md"
    wb.close()


def test_attention_is_labelled_by_segment(tmp_path: Path) -> None:
    wb = make_wb(tmp_path, replay="attention.jsonl")
    _, tab = wb.reset_payload(None)
    collect(wb, tab, "go")
    res = wb.attention(tab.sid or "", 10)
    assert res is not None and len(res["layers"]) == 4
    tr = load_trace(FIX / "attention.jsonl")
    att = tr.tokens[10].attention
    assert att is not None
    layer0 = res["layers"][0]
    assert [r[3] for r in layer0["segments"]] == [m for _, m in att.segment_mass[0]]
    assert layer0["segments"][0][1] == "Echo"
    assert [r[0] for r in layer0["top"]] == [p for p, _ in att.top[0]]
    assert wb.attention(tab.sid or "", 10_000) is None
    assert wb.attention("bad id!", 1) is None
    wb.close()


def test_long_session_reset_is_capped(tmp_path: Path) -> None:
    from thoughtform.ui.service import MAX_RESET_MESSAGES

    wb = make_wb(tmp_path)
    sid = wb.new_session().id
    for k in range(MAX_RESET_MESSAGES + 50):
        wb.store.add_message(sid, "user", f"message {k}")
    pl, tab = wb.reset_payload(sid)
    evs = json.loads(pl)["ev"]
    assert ["X", 50] in evs
    ms = [e for e in evs if e[0] == "M"]
    assert len(ms) == MAX_RESET_MESSAGES
    assert next(e for e in evs if e[0] == "T")[1] == "message 50"
    assert tab.known == MAX_RESET_MESSAGES + 50
    wb.close()


def test_replay_dir_only_serves_its_own_files(tmp_path: Path) -> None:
    from thoughtform.ui.service import WorkbenchError

    cfg = ServeConfig(backend="replay", replay=str(FIX), db=str(tmp_path / "s.db"))
    wb = Workbench(cfg)
    assert "voices.jsonl" in wb.replay_files()
    assert wb.replay_path("long.txt") == FIX / "long.txt"
    for bad in ("../test_ui_stream.py", "/etc/passwd", str(FIX / "voices.jsonl"), "nope.jsonl"):
        with pytest.raises(WorkbenchError):
            wb.replay_path(bad)
    assert wb.default_settings()["backend"] == "replay"
    wb.close()


def test_voice_editor_rows_and_yaml() -> None:
    from thoughtform.ui.app import voices_from_rows, voices_from_yaml
    from thoughtform.voices import VoiceSetError

    seed = PRESETS["seed"]
    rows = [
        ["Echo", "#112233", "◎", "bracket", "echo-voice, ECHO2", "reflects"],
        ["think", "", "", "tag", "", "reasons"],
        ["", "", "", "", "", ""],  # blank rows are ignored
    ]
    vs = voices_from_rows(rows, seed)
    assert [v.name for v in vs.voices] == ["Echo", "think"]
    assert vs.get("echo-voice") is vs.get("Echo") and vs.color_of("Echo") == "#112233"
    assert vs.voice("think").syntax == "tag" and vs.voice("think").color  # colour filled in
    assert vs.unknown == seed.unknown and vs.default_voice == seed.default_voice
    with pytest.raises(VoiceSetError, match="color"):
        voices_from_rows([["Echo", "red;background:url(x)", "", "", "", ""]], seed)
    with pytest.raises(VoiceSetError, match="name"):
        voices_from_rows([['<img src=x onerror="alert(1)">', "", "", "", "", ""]], seed)
    assert voices_from_yaml(seed.to_yaml()) == seed
    with pytest.raises(VoiceSetError, match="line"):
        voices_from_yaml("voices: [\n  - name: x\n bad")


class _DiesMidStream:
    """A backend whose connection drops after three tokens (an exception, not a FinishEvent)."""

    name = "dies"

    def stream(self, request: Any, cancel: Any = None) -> Any:
        from thoughtform.backends.base import TokenEvent

        yield TokenEvent(text="[Echo] ")
        yield TokenEvent(text="half ")
        yield TokenEvent(text="a <b>thought</b>")
        raise ConnectionResetError("peer reset")

    def close(self) -> None:
        pass


def test_backend_dying_mid_stream_keeps_the_partial_reply(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    wb.backend_for = lambda s: _DiesMidStream()  # type: ignore[method-assign]
    _, tab = wb.reset_payload(None)
    payloads, _ = collect(wb, tab, "go")
    rep = reply_events(flat(payloads))
    assert rep[-1][:2] == ["E", "error"] and "peer reset" in rep[-1][2]
    assert [e[1] for e in rep if e[0] == "O"] == ["Echo"]
    msgs = wb.store.messages(tab.sid or "")
    assert msgs[1].status == "error" and msgs[1].text == "[Echo] half a <b>thought</b>"
    pl, _ = wb.reset_payload(tab.sid)  # reopened: still there, still marked as failed
    ev = json.loads(pl)["ev"]
    assert ["E", "error"] == next(e for e in ev if e[0] == "E")[:2]
    wb.close()


class _ScoresVoices:
    """A backend that says who speaks next at each boundary the way an HTTP backend does
    (``Conductor.record_choice``), then writes that voice's block."""

    name = "scores"

    def stream(self, request: Any, cancel: Any = None) -> Any:
        from thoughtform.backends.base import FinishEvent, TokenEvent

        c = request.conductor
        c.record_choice({"Echo": 0.6, "Doubt": 0.3, "Pulse": 0.05}, approximate=False)
        yield TokenEvent(text="[Echo]")
        yield TokenEvent(text=" the rain.\n")
        c.record_choice({"Echo": 0.1, "Doubt": 0.7, "Pulse": 0.15}, forced=True)
        yield TokenEvent(text="[Doubt]")
        yield TokenEvent(text=" or <b>not</b>.")
        yield FinishEvent("stop")

    def close(self) -> None:
        pass


def test_voice_choices_stream_persist_and_feed_the_model_matrix(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    wb.backend_for = lambda s: _ScoresVoices()  # type: ignore[method-assign]
    _, tab = wb.reset_payload(None)
    live1, tab = collect(wb, tab, "first")
    live2, tab = collect(wb, tab, "second")
    w1 = [e for e in flat(live1) if e[0] == "W"]
    # One W per boundary, global token indices (the block's first token), who opened it.
    assert [(e[1], e[3], e[4], e[5]) for e in w1] == [(0, "Echo", 0, 0), (2, "Doubt", 1, 1)]
    assert dict(map(tuple, w1[0][2])) == {"Echo": 0.6, "Doubt": 0.3, "Pulse": 0.05}
    # Each W comes after the O of the block it chose (the page puts it at that block).
    evs = flat(live1)
    o_doubt = next(i for i, e in enumerate(evs) if e[0] == "O" and e[1] == "Doubt")
    assert evs.index(w1[1]) > o_doubt
    w2 = [e for e in flat(live2) if e[0] == "W"]
    assert [e[1] for e in w2] == [4, 6]  # the second reply's tokens follow the first's
    # Kept with the stored reply: a reload shows the same W events.
    msgs = wb.store.messages(tab.sid or "")
    kept = msgs[1].finish["voice_choices"]  # type: ignore[index]
    assert [c["chosen"] for c in kept] == ["Echo", "Doubt"] and kept[1]["forced"] is True
    pl, _ = wb.reset_payload(tab.sid)
    reset = json.loads(pl)["ev"]
    assert [e for e in reset if e[0] == "W"] == w1 + w2
    # Stats: the observed matrix, and the model's own: after Echo it wanted Doubt at 0.7
    # (each reply's opening boundary has no voice before it, so no Doubt -> Echo row).
    stats = reset[-1]
    assert stats[0] == "S" and len(stats) == 4
    order, mat = stats[3]
    assert order[:2] == stats[2][0][:2]
    e, d = order.index("Echo"), order.index("Doubt")
    assert mat[e][d] == pytest.approx(0.7) and mat[e][e] == pytest.approx(0.1)
    assert sum(mat[d]) == 0.0
    last_live_stats = [x for x in flat(live2) if x[0] == "S"][-1]
    assert last_live_stats[3] == stats[3]
    wb.close()


def test_stored_choices_ignore_malformed_records() -> None:
    from thoughtform.ui.stream import Encoder, stored_choices, with_choices
    from thoughtform.voices import resolve_voice_set

    fin = with_choices({"reason": "stop"}, [{"token": 0, "probs": {"Echo": 1.0}}])
    assert fin == {"reason": "stop", "voice_choices": [{"token": 0, "probs": {"Echo": 1.0}}]}
    assert with_choices({"reason": "stop"}, []) == {"reason": "stop"}
    bad = {"voice_choices": [1, "x", {"probs": "no"}, {"token": "7", "probs": {"Echo": "nan"}}]}
    got = stored_choices(bad)
    assert len(got) == 1
    ev = Encoder(resolve_voice_set("seed")).choice_events(got, 10)
    assert ev == [["W", None, [], None, 0, 0]]  # a non-numeric token or p never reaches the page
    assert stored_choices(None) == [] and stored_choices({"voice_choices": {}}) == []


def test_legend_steering_actions_and_state(tmp_path: Path) -> None:
    from thoughtform.ui.steer_view import steer_action

    wb = make_wb(tmp_path)
    _, tab = wb.reset_payload(None)
    sid = tab.sid or ""
    got = steer_action(wb, sid, "mute", "doubt", None)  # names resolve like the voice set's
    assert got == {"ok": True, "muted": ["Doubt"], "next": None}
    got = steer_action(wb, sid, "next", "Echo", None)
    assert got == {"ok": True, "muted": ["Doubt"], "next": "Echo"}
    # The reloaded page gets the state with the I event.
    info = next(e for e in json.loads(wb.reset_payload(sid)[0])["ev"] if e[0] == "I")[1]
    assert info["muted"] == ["Doubt"] and info["next_voice"] == "Echo"
    assert info["structure"] is False
    assert steer_action(wb, sid, "next", "Echo", None)["next"] is None  # again: cleared
    assert steer_action(wb, sid, "mute", "Doubt", None)["muted"] == []  # toggled back
    steer_action(wb, sid, "next", "Doubt", None)
    # Muting the pending next voice clears it.
    got = steer_action(wb, sid, "mute", "Doubt", None)
    assert got == {"ok": True, "muted": ["Doubt"], "next": None}
    steer_action(wb, sid, "mute", "Doubt", None)
    bad = steer_action(wb, sid, "mute", "<Nobody>", None)
    assert bad["ok"] is False and "unknown voice" in bad["error"]
    assert steer_action(wb, sid, "explode", "Echo", None)["ok"] is False
    assert steer_action(wb, 42, "mute", "Echo", None)["ok"] is False
    assert steer_action(wb, "no-such-session-id", "mute", "Echo", None)["ok"] is False
    # "next" is used by one reply: the stored setting is cleared once it is sent.
    steer_action(wb, sid, "next", "Pulse", None)
    _, tab = collect(wb, tab, "go")
    assert steer_action(wb, sid, "state", "", None) == {"ok": True, "muted": [], "next": None}
    wb.close()


def test_recorded_sessions_are_labelled_and_keep_the_mark(tmp_path: Path) -> None:
    wb = make_wb(tmp_path)
    plain = wb.new_session().id
    rec = wb.store.create_session(
        title="from an app", settings={"recorded": True, "source": "proxy", "backend": "replay"}
    )
    labels = dict((sid, label) for label, sid in wb.session_choices())
    assert labels[rec].startswith("● Recorded · from an app")
    assert "Recorded" not in labels[plain]
    # Saving settings or muting a voice in a recorded session keeps it recorded.
    wb.save_settings(rec, {"backend": "replay", "max_tokens": 5})
    from thoughtform.ui.steer_view import steer_action

    steer_action(wb, rec, "mute", "Echo", None)
    info = wb.session_info(rec)
    assert info is not None and info.settings["recorded"] is True
    assert info.settings["source"] == "proxy" and info.settings["max_tokens"] == 5
    assert "Recorded" in dict((s, lab) for lab, s in wb.session_choices())[rec]
    wb.close()
