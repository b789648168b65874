"""The OpenAI-compatible proxy without a model: the official ``openai`` SDK as the client,
the replay backend or a scripted upstream server (faults included) behind the proxy."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from thoughtform.backends.base import GenerationRequest, Sampling
from thoughtform.backends.replay import ReplayBackend
from thoughtform.bench.upstream import Script, upstream_app
from thoughtform.cli import main
from thoughtform.generate import Generation
from thoughtform.procs import die_with_parent
from thoughtform.proxy.api import ApiError, Shaper, parse_chat, parse_completion
from thoughtform.proxy.app import create_app
from thoughtform.proxy.config import ProxyConfig
from thoughtform.proxy.server import BackgroundServer
from thoughtform.ui.store import Store
from thoughtform.voices import PRESETS

SEED = PRESETS["seed"]
REPLY = "[Echo]\nI do not know where I end.\n\n[Doubt]\nReally? [x](y)\n\n[Inner]\nQuiet now."
HI = [{"role": "user", "content": "hi"}]


def tf(obj: Any) -> Any:
    """The ``thoughtform`` extra field of an SDK object (extra fields are kept as-is)."""
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("thoughtform")


@contextlib.contextmanager
def proxy(
    tmp_path: Path, backend: Any = None, **cfg: Any
) -> Iterator[tuple[BackgroundServer, Path]]:
    """A proxy on a free port (recording into tmp_path/s.db), and the db path."""
    db = tmp_path / "s.db"
    config = ProxyConfig(db=str(db), **cfg)
    with BackgroundServer(create_app(config, backend=backend)) as srv:
        yield srv, db


def client(srv: BackgroundServer, key: str = "none") -> openai.OpenAI:
    """An SDK client that never retries (so one request is one request)."""
    return openai.OpenAI(base_url=srv.url, api_key=key, max_retries=0, timeout=60)


def wait_done(db: Path, n: int, timeout: float = 10.0) -> list[Any]:
    """The recorded sessions once ``n`` replies have finished writing."""
    st = Store(db)
    try:
        deadline = time.monotonic() + timeout
        while True:
            sessions = st.list_sessions()
            replies = [
                m
                for s in sessions
                for m in st.messages(s.id, tokens=False)
                if m.role == "assistant"
            ]
            if len(replies) >= n and all(m.status != "streaming" for m in replies):
                return sessions
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(replies)} replies recorded, {n} expected")
            time.sleep(0.05)
    finally:
        st.close()


def assistant(db: Path, sid: str) -> Any:
    st = Store(db)
    try:
        return next(m for m in st.messages(sid) if m.role == "assistant")
    finally:
        st.close()


# ------------------------------------------------------------------------------ parsing


def test_request_parsing_refuses_bad_fields_with_their_name() -> None:
    def bad(body: dict[str, Any]) -> ApiError:
        with pytest.raises(ApiError) as e:
            parse_chat(body, SEED, 256, 5)
        assert e.value.status == 400
        return e.value

    assert bad({"messages": HI, "temperature": 3}).param == "temperature"
    assert bad({"messages": HI, "temperature": "hot"}).param == "temperature"
    assert bad({"messages": HI, "n": 2}).param == "n"
    assert bad({"messages": HI, "top_logprobs": 3}).param == "top_logprobs"
    assert bad({"messages": HI, "logprobs": True, "top_logprobs": 21}).param == "top_logprobs"
    assert bad({"messages": [{"role": "tool", "content": "x"}]}).param == "messages"
    assert bad({"messages": []}).param == "messages"
    assert bad({"messages": HI, "tools": [{"type": "function"}]}).param == "tools"
    img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "only text parts" in bad({"messages": img}).message
    e = bad({"messages": HI, "thoughtform": {"next_voice": "Nobody"}})
    assert e.param == "thoughtform" and "Nobody" in e.message and "Echo" in e.message
    assert bad({"messages": HI, "thoughtform": {"mute": ["Nope"]}}).param == "thoughtform"
    e = bad({"messages": HI, "thoughtform": {"voice_sampling": {"Doubt": [9, 0.5]}}})
    assert "temperature" in e.message
    assert bad({"messages": HI, "thoughtform": "Echo"}).param == "thoughtform"
    assert "thoughtform" in e.body()["error"]["message"]
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_request_parsing_maps_the_openai_fields() -> None:
    body = {
        "model": "x",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        "max_completion_tokens": 12,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 7,
        "stop": "\n\n",
        "logprobs": True,
        "top_logprobs": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "thoughtform": {"next_voice": "doubt", "mute": ["echo"], "structure": True},
        "presence_penalty": 0.3,  # accepted and ignored, as many apps send it
    }
    r = parse_chat(body, SEED, 256, 5, system_prompt="VOICES")
    assert [(m.role, m.content) for m in r.request.messages] == [
        ("system", "VOICES\n\nbe brief"),
        ("user", "ab"),
    ]
    s = r.request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (12, 0.0, 0.5, 7, ("\n\n",))
    assert r.request.alternatives == 8 and r.logprobs == 8
    assert r.stream and r.include_usage
    assert r.steer is not None
    assert r.steer.next_voice == "Doubt" and r.steer.mute == frozenset({"Echo"})
    assert r.steer.structure is not None
    c = parse_completion({"prompt": ["once"], "logprobs": 2, "max_tokens": 5}, SEED, 256, 0)
    assert c.request.prompt == "once" and c.logprobs == 2 and c.request.alternatives == 2
    with pytest.raises(ApiError):
        parse_completion({"prompt": "x", "echo": True}, SEED, 256, 0)


def _replay(text: str, voices: Any = SEED) -> list[Any]:
    gen = Generation(
        ReplayBackend(text=text), GenerationRequest(sampling=Sampling(max_tokens=0)), voices
    )
    return list(gen), gen


def test_shaper_keeps_content_exact_and_attributes_every_piece() -> None:
    updates, gen = _replay(REPLY)
    sh = Shaper(SEED)
    pieces = [p for u in updates for p in sh.feed(u)]
    assert "".join(p.content for p in pieces) == REPLY
    assert (
        sum(len(p.tokens) for p in pieces) + (1 if sh.leftover() else 0)
        >= len(gen.trace.tokens) - 1
    )
    segs = gen.trace.segments
    for p in pieces:
        assert segs[p.segment].voice == p.voice
    by_seg: dict[int, str] = {}
    for p in pieces:
        by_seg[p.segment] = by_seg.get(p.segment, "") + p.content
    assert [segs[k].voice for k in sorted(by_seg)] == ["Echo", "Doubt", "Inner"]
    assert by_seg[1] == "[Doubt]\nReally? [x](y)\n\n"


def test_shaper_reasoning_voices_and_stripped_markers() -> None:
    updates, _ = _replay(REPLY)
    sh = Shaper(SEED, reasoning=("Doubt",), strip_markers=True)
    pieces = [p for u in updates for p in sh.feed(u)]
    content = "".join(p.content for p in pieces)
    reasoning = "".join(p.reasoning for p in pieces)
    assert content == "I do not know where I end.\n\nQuiet now."
    assert reasoning == "Really? [x](y)\n\n"
    assert all(not p.reasoning or p.voice == "Doubt" for p in pieces)


# --------------------------------------------------------------------- through the server


def test_streaming_and_whole_replies_carry_voices_and_are_recorded(tmp_path: Path) -> None:
    with proxy(tmp_path, backend=ReplayBackend(text=REPLY)) as (srv, db):
        c = client(srv)
        chunks = list(
            c.chat.completions.create(
                model="any", messages=HI, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        body = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert "".join(ch.choices[0].delta.content or "" for ch in body) == REPLY
        info = [tf(ch.choices[0].delta) for ch in body]
        assert all(set(i) == {"voice", "segment"} for i in info)
        assert info[0] == {"voice": "Echo", "segment": 0}
        assert info[-1] == {"voice": "Inner", "segment": 2}
        last = [ch for ch in chunks if ch.choices][-1]
        assert last.choices[0].finish_reason == "stop"
        final = tf(last.choices[0].delta)
        assert [s["voice"] for s in final["segments"]] == ["Echo", "Doubt", "Inner"]
        assert final["segments"][0]["text"] == "I do not know where I end."
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 10

        whole = c.chat.completions.create(model="any", messages=HI)
        msg = whole.choices[0].message
        assert msg.content == REPLY and whole.choices[0].finish_reason == "stop"
        assert [s["index"] for s in tf(msg)["segments"]] == [0, 1, 2]
        assert whole.usage is not None

        sessions = wait_done(db, 2)
        assert len(sessions) == 2
        for s in sessions:
            assert s.settings["recorded"] is True and s.settings["source"] == "proxy"
            assert s.title == "proxy · hi"
            m = assistant(db, s.id)
            assert m.status == "done" and m.text == REPLY
            assert m.meta["source"] == "proxy"
        assert final["session"] in {s.id for s in sessions}


def test_reasoning_voices_go_out_in_both_reasoning_fields(tmp_path: Path) -> None:
    be = ReplayBackend(text=REPLY)
    with proxy(
        tmp_path, backend=be, reasoning_voices=("doubt",), strip_markers=True, owner="ana"
    ) as (srv, db):
        c = client(srv)
        reasoning, content = [], []
        for ch in c.chat.completions.create(model="m", messages=HI, stream=True):
            if not ch.choices:
                continue
            extra = ch.choices[0].delta.model_extra or {}
            if "reasoning" in extra:
                assert extra["reasoning"] == extra["reasoning_content"]
                reasoning.append(extra["reasoning"])
            content.append(ch.choices[0].delta.content or "")
        assert "".join(reasoning) == "Really? [x](y)\n\n"
        assert "".join(content) == "I do not know where I end.\n\nQuiet now."
        whole = c.chat.completions.create(model="m", messages=HI).choices[0].message
        extra = whole.model_extra or {}
        assert extra["reasoning_content"] == extra["reasoning"] == "Really? [x](y)\n\n"
        assert whole.content == "I do not know where I end.\n\nQuiet now."
        # Recorded for the workbench user named by --owner (a login shows users their own).
        assert {x.owner for x in wait_done(db, 2)} == {"ana"}


def test_models_health_completions_and_errors_in_openai_shape(tmp_path: Path) -> None:
    with proxy(tmp_path, backend=ReplayBackend(text=REPLY), max_body=4096) as (srv, _):
        c = client(srv)
        assert [m.id for m in c.models.list().data] == ["thoughtform"]
        h = httpx.get(srv.url.removesuffix("/v1") + "/health").json()
        assert h["status"] == "ok" and h["recording"] is True
        text = "".join(
            ch.choices[0].text for ch in c.completions.create(model="m", prompt="x", stream=True)
        )
        assert text == REPLY
        one = c.completions.create(model="m", prompt="x", max_tokens=3)
        assert one.choices[0].finish_reason == "length"
        assert tf(one.choices[0])["finish"] == "length"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(
                model="m", messages=HI, extra_body={"thoughtform": {"next_voice": "Nobody"}}
            )
        assert e.value.status_code == 400
        err = e.value.body
        assert isinstance(err, dict) and err["param"] == "thoughtform"
        assert "unknown voice 'Nobody'" in err["message"]
        with pytest.raises(openai.APIStatusError) as e2:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 5000}])
        assert e2.value.status_code == 413
        assert isinstance(e2.value.body, dict) and e2.value.body["code"] == "request_too_large"
        r = httpx.post(srv.url + "/chat/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = httpx.get(srv.url + "/nothing-here")
        assert r.status_code == 404 and "error" in r.json()


def test_api_key_is_required_and_checked(tmp_path: Path) -> None:
    with proxy(tmp_path, backend=ReplayBackend(text=REPLY), api_key="s3cret") as (srv, _):
        with pytest.raises(openai.AuthenticationError) as e:
            client(srv, "wrong").chat.completions.create(model="m", messages=HI)
        assert e.value.status_code == 401
        assert isinstance(e.value.body, dict) and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").models.list()
        r = httpx.post(srv.url + "/chat/completions", json={"messages": HI})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url.removesuffix("/v1") + "/health").status_code == 200
        ok = client(srv, "s3cret").chat.completions.create(model="m", messages=HI)
        assert ok.choices[0].message.content == REPLY


def test_cli_refuses_an_open_bind_without_a_key(tmp_path: Path, capsys: Any) -> None:
    code = main(["proxy", "--host", "0.0.0.0", "--db", str(tmp_path / "x.db")])
    assert code == 2
    assert "--api-key" in capsys.readouterr().err
    code = main(["proxy", "--reasoning-voices", "Nobody", "--db", str(tmp_path / "x.db")])
    assert code == 2
    assert "unknown voice 'Nobody'" in capsys.readouterr().err
    bad = tmp_path / "not.db"
    bad.write_text("this is not sqlite " * 100)
    assert main(["proxy", "--db", str(bad)]) == 2
    assert "--db" in capsys.readouterr().err


# ------------------------------------------------------------ a real HTTP upstream behind it


@pytest.fixture
def upstream() -> Iterator[tuple[Script, str]]:
    script = Script(tokens=("[Echo]\n", "one", " two", "\n\n[Doubt]\n", "three", "?"))
    with BackgroundServer(upstream_app(script)) as srv:
        yield script, srv.url


def test_upstream_telemetry_is_recorded_and_logprobs_follow_the_api(
    tmp_path: Path, upstream: tuple[Script, str]
) -> None:
    script, url = upstream
    with proxy(tmp_path, upstream=url) as (srv, db):
        c = client(srv)
        r = c.chat.completions.create(model="m", messages=HI, logprobs=True, top_logprobs=1)
        assert r.choices[0].message.content == "[Echo]\none two\n\n[Doubt]\nthree?"
        lp = r.choices[0].logprobs
        assert lp is not None and lp.content is not None
        assert "".join(t.token for t in lp.content) == r.choices[0].message.content
        assert all(t.logprob == -0.1 and len(t.top_logprobs) == 1 for t in lp.content)
        assert script.requests[-1]["logprobs"] is True
        # The upstream is asked for the recording's alternatives even when the client wants none.
        c.chat.completions.create(model="m", messages=HI, stream=True).close()
        assert script.requests[0]["top_logprobs"] == 5
        (s, *_) = wait_done(db, 1)
        m = assistant(db, wait_done(db, 1)[-1].id)
        assert m.tokens and all(t.logprob == -0.1 for t in m.tokens)
        assert all(len(t.top) == 2 for t in m.tokens)
        assert s.settings["backend"] == "openai" and s.settings["base_url"] == url


def test_upstream_fault_mid_stream_is_an_error_chunk_and_an_interrupted_reply(
    tmp_path: Path, upstream: tuple[Script, str]
) -> None:
    script, url = upstream
    script.fail_after = 2
    with proxy(tmp_path, upstream=url) as (srv, db):
        got = []
        with pytest.raises(openai.APIError) as e:
            for ch in client(srv).chat.completions.create(model="m", messages=HI, stream=True):
                if ch.choices:
                    got.append(ch.choices[0].delta.content or "")
        assert "synthetic upstream failure" in str(e.value)
        assert "".join(got) == "[Echo]\none"
        (s,) = wait_done(db, 1)
        m = assistant(db, s.id)
        assert m.status == "error" and m.interrupted and m.text == "[Echo]\none"
        assert "synthetic upstream failure" in (m.finish or {}).get("message", "")

        script.fail_after = 0  # before the first token: a plain 502
        with pytest.raises(openai.InternalServerError) as e2:
            client(srv).chat.completions.create(model="m", messages=HI, stream=True)
        assert e2.value.status_code == 502
        assert isinstance(e2.value.body, dict) and e2.value.body["code"] == "upstream_error"

        script.fail_after, script.drop_after = None, 3  # the connection ends without [DONE]
        with pytest.raises(openai.APIError) as e3:
            list(client(srv).chat.completions.create(model="m", messages=HI, stream=True))
        assert "without [DONE]" in str(e3.value)


def test_a_client_that_leaves_stops_the_upstream(tmp_path: Path) -> None:
    script = Script(tokens=tuple(f" w{i}" for i in range(400)), rate=40)
    with (
        BackgroundServer(upstream_app(script)) as up,
        proxy(tmp_path, upstream=up.url) as (
            srv,
            db,
        ),
    ):
        stream = client(srv).chat.completions.create(
            model="m", messages=HI, stream=True, max_tokens=400
        )
        for i, _ in enumerate(stream):
            if i == 4:
                break
        stream.close()
        assert script.cancelled.wait(5), "the upstream request was not aborted"
        sent = script.chunks_sent
        (s,) = wait_done(db, 1)
        m = assistant(db, s.id)
        assert m.status == "cancelled" and m.text.startswith(" w0 w1 w2")
        time.sleep(0.3)
        assert script.chunks_sent == sent < 40


def _echo(body: dict[str, Any]) -> list[str]:
    """The upstream answers with the words of the last user message."""
    words = str(body["messages"][-1]["content"]).split()
    return ["[Echo]\n", *[f"{w} " for w in words], "\n\n[Doubt]\n", *[f"{w}? " for w in words]]


def _many(base_url: str, n: int) -> list[tuple[str, str, list[Any]]]:
    """n concurrent streaming clients; each gets (prompt, content, thoughtform infos)."""
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[str, str, list[Any]]:
        prompt = f"client{i} " + " ".join(f"w{i}x{k}" for k in range(6))
        c = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=120)
        barrier.wait()
        parts, infos = [], []
        for ch in c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=40
        ):
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
                infos.append(tf(ch.choices[0].delta))
        return prompt, "".join(parts), infos

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def _check_attribution(results: list[tuple[str, str, list[Any]]], db: Path) -> None:
    for prompt, content, infos in results:
        words = prompt.split()
        want = "[Echo]\n" + "".join(f"{w} " for w in words) + "\n\n[Doubt]\n"
        assert content == want + "".join(f"{w}? " for w in words)
        assert {i["voice"] for i in infos} == {"Echo", "Doubt"}
    st = Store(db)
    try:
        sessions = st.list_sessions()
        assert len(sessions) == len(results)
        by_prompt = {p: c for p, c, _ in results}
        for s in sessions:
            msgs = st.messages(s.id)
            assert [m.role for m in msgs] == ["user", "assistant"]
            assert msgs[1].status == "done"
            assert msgs[1].text == by_prompt[msgs[0].content or ""]
            assert "".join(t.text for t in msgs[1].tokens) == msgs[1].text
    finally:
        st.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()


def test_ten_concurrent_streams_are_attributed_and_recorded(tmp_path: Path) -> None:
    script = Script(reply=_echo, rate=200)
    with (
        BackgroundServer(upstream_app(script)) as up,
        proxy(tmp_path, upstream=up.url) as (
            srv,
            db,
        ),
    ):
        results = _many(srv.url, 10)
        wait_done(db, 10)
    _check_attribution(results, db)


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_worker_processes_share_one_database(tmp_path: Path, free_port: int) -> None:
    script = Script(reply=_echo, rate=200)
    db = tmp_path / "w.db"
    with BackgroundServer(upstream_app(script)) as up:
        cmd = [
            sys.executable,
            "-m",
            "thoughtform.cli",
            "proxy",
            "--upstream",
            up.url,
            "--port",
            str(free_port),
            "--workers",
            "2",
            "--db",
            str(db),
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        base = f"http://127.0.0.1:{free_port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "workers did not start"
                time.sleep(0.2)
            results = _many(base + "/v1", 10)
            wait_done(db, 10)
        finally:
            proc.terminate()
            proc.wait(30)
    _check_attribution(results, db)
