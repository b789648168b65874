"""The proxy on real models, the official ``openai`` SDK as the client: the embedded model in
process (llama.cpp with the voices adapter) and a real ``llama_cpp.server`` upstream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from thoughtform.proxy.app import create_app
from thoughtform.proxy.config import ProxyConfig
from thoughtform.proxy.server import BackgroundServer
from thoughtform.ui.store import Store

pytestmark = pytest.mark.model
pytest_plugins = ["llama_server"]

ASK = [{"role": "user", "content": "Is the sea blue?"}]


def tf(obj: Any) -> Any:
    return (getattr(obj, "model_extra", None) or {}).get("thoughtform")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One proxy on the embedded model with the voices adapter for the module."""
    db = tmp_path_factory.mktemp("proxy") / "s.db"
    app = create_app(ProxyConfig(upstream="embedded-voices", db=str(db)))
    with BackgroundServer(app) as srv:
        yield srv.url, db


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


def reply_of(db: Path, sid: str) -> Any:
    """The recorded reply of session ``sid`` once it has finished."""
    import time

    st = Store(db)
    try:
        deadline = time.monotonic() + 20
        while True:
            msgs = st.messages(sid)
            if msgs and msgs[-1].role == "assistant" and msgs[-1].status != "streaming":
                return msgs[-1]
            assert time.monotonic() < deadline, "reply not recorded"
            time.sleep(0.05)
    finally:
        st.close()


def stream_all(c: openai.OpenAI, **kw: Any) -> tuple[str, list[Any], Any, list[Any]]:
    """Content, (chunk info, logprob items) per content chunk, final info, all chunks."""
    chunks = list(c.chat.completions.create(model="m", stream=True, **kw))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    per = [
        (tf(ch.choices[0].delta), ch.choices[0].logprobs)
        for ch in chunks
        if ch.choices and ch.choices[0].finish_reason is None and tf(ch.choices[0].delta)
    ]
    final = tf([ch for ch in chunks if ch.choices][-1].choices[0].delta)
    return content, per, final, chunks


def test_embedded_stream_has_voices_logprobs_and_is_recorded(
    embedded: tuple[str, Path],
) -> None:
    url, db = embedded
    content, per, final, _ = stream_all(
        sdk(url), messages=ASK, max_tokens=40, seed=3, logprobs=True, top_logprobs=3
    )
    assert final["finish"] in ("stop", "length")
    segs = final["segments"]
    assert segs and all(segs[info["segment"]]["voice"] == info["voice"] for info, _ in per)
    items = [it for _, lp in per if lp is not None for it in lp.content or []]
    assert "".join(it.token for it in items) == content
    assert all(it.logprob <= 0 and len(it.top_logprobs) == 3 for it in items)
    m = reply_of(db, final["session"])
    assert m.status == "done" and m.text == content
    assert len(m.tokens) == len(items)
    assert all(t.entropy is not None and t.logprob is not None for t in m.tokens)
    assert {t.voice for t in m.tokens} >= {s["voice"] for s in segs if s["text"]}


def test_embedded_steering_through_extra_body(embedded: tuple[str, Path]) -> None:
    url, db = embedded
    r = sdk(url).chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=48,
        seed=5,
        extra_body={"thoughtform": {"next_voice": "Doubt", "mute": ["Echo"]}},
    )
    msg = r.choices[0].message
    assert (msg.content or "").startswith("[Doubt]")
    voices = [s["voice"] for s in tf(msg)["segments"]]
    assert voices[0] == "Doubt" and "Echo" not in voices
    m = reply_of(db, tf(msg)["session"])
    assert m.meta["steer"]["next_voice"] == "Doubt" and m.meta["steer"]["mute"] == ["Echo"]
    with pytest.raises(openai.BadRequestError) as e:
        sdk(url).chat.completions.create(
            model="m", messages=ASK, extra_body={"thoughtform": {"mute": ["Nobody"]}}
        )
    assert "unknown voice 'Nobody'" in str(e.value)


def test_embedded_legacy_completions_with_logprobs(embedded: tuple[str, Path]) -> None:
    url, _ = embedded
    r = sdk(url).completions.create(
        model="m", prompt="[Echo]\nThe sea", max_tokens=12, logprobs=2, seed=1
    )
    ch = r.choices[0]
    assert ch.text and ch.logprobs is not None
    lp = ch.logprobs
    assert "".join(lp.tokens or []) == ch.text
    offs = lp.text_offset or []
    assert offs[0] == 0 and offs == sorted(offs)
    assert all(len(t) <= 2 for t in lp.top_logprobs or [])


def test_embedded_ten_concurrent_streams(embedded: tuple[str, Path]) -> None:
    url, db = embedded
    n = 10
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[str, str, str]:
        prompt = f"Client {i}: name a colour."
        c = sdk(url)
        barrier.wait()
        content, per, final, _ = stream_all(
            c, messages=[{"role": "user", "content": prompt}], max_tokens=8, seed=i
        )
        assert all(final["segments"][k["segment"]]["voice"] == k["voice"] for k, _ in per)
        return prompt, content, final["session"]

    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    assert len({sid for _, _, sid in results}) == n
    st = Store(db)
    try:
        for prompt, content, sid in results:
            msgs = st.messages(sid)
            assert msgs[0].content == prompt
            assert reply_of(db, sid).text == content
    finally:
        st.close()


def test_embedded_client_disconnect_cancels_generation(embedded: tuple[str, Path]) -> None:
    url, db = embedded
    stream = sdk(url).chat.completions.create(
        model="m", messages=ASK, stream=True, max_tokens=48, seed=2
    )
    sid = None
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    st = Store(db)
    try:
        # The newest session is this one.
        sid = max(st.list_sessions(), key=lambda s: s.created).id
    finally:
        st.close()
    m = reply_of(db, sid)
    assert m.status == "cancelled" and len(m.tokens) < 48


def test_llama_server_upstream(llama_server: str, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    cfg = ProxyConfig(upstream=llama_server, db=str(db), voice_prompt=True, alternatives=3)
    with BackgroundServer(create_app(cfg)) as srv:
        c = sdk(srv.url)
        assert c.models.list().data[0].id.endswith(".gguf")
        content, per, final, _ = stream_all(
            c, messages=ASK, max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=2
        )
        assert content and final["finish"] in ("stop", "length")
        items = [it for _, lp in per if lp is not None for it in lp.content or []]
        assert "".join(it.token for it in items) == content
        assert all(it.logprob <= 0 for it in items)
        m = reply_of(db, final["session"])
        assert m.text == content and all(t.logprob is not None for t in m.tokens)
        assert all(1 <= len(t.top) <= 3 for t in m.tokens)
        whole = c.chat.completions.create(model="m", messages=ASK, max_tokens=16, temperature=0.0)
        assert whole.choices[0].message.content == content  # greedy: the same reply
        assert tf(whole.choices[0].message)["segments"]
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(
                model="m", messages=ASK, extra_body={"thoughtform": {"next_voice": "Nobody"}}
            )
        # Steering reaches a server too (the openai backend's stop-and-continue; this server
        # can prefill a raw prompt, not a chat reply).
        steered = c.completions.create(
            model="m",
            prompt="Q: Is the sea blue?\nA:\n",
            max_tokens=16,
            temperature=0.0,
            extra_body={"thoughtform": {"next_voice": "Doubt"}},
        )
        assert steered.choices[0].text.startswith("[Doubt]")
        assert tf(steered.choices[0])["segments"][0]["voice"] == "Doubt"
