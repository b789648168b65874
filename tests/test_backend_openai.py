"""OpenAI-compatible backend against recorded SSE byte streams replayed by a raw local HTTP
server (faults included), plus SSE parser properties. No model needed."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thoughtform.backends import create_backend
from thoughtform.backends.base import (
    FinishEvent,
    GenerationRequest,
    Message,
    Sampling,
    TokenEvent,
)
from thoughtform.backends.openai import (
    OpenAIBackend,
    SSEEvent,
    SSEParser,
    fit_texts,
    normalize_base_url,
)
from thoughtform.generate import Generation

FIX = Path(__file__).parent / "fixtures" / "openai"
CHAT = GenerationRequest(messages=(Message("user", "hi"),), alternatives=3)


# ------------------------------------------------------------------ raw HTTP test server


@dataclass
class Req:
    """A request as the test server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


Script = Callable[[socket.socket, Req, "RawServer"], None]


@dataclass
class RawServer:
    """HTTP/1.1 on 127.0.0.1, one thread per connection, the response written by a script with
    full control of the bytes (chunked encoding, sleeps, resets)."""

    script: Script
    requests: list[Req] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnect_at: float | None = None

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                part = conn.recv(65536)
                if not part:
                    return
                buf += part
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            n = int(headers.get("content-length", "0"))
            while len(body) < n:
                body += conn.recv(65536)
            req = Req(method, path, headers, body)
            self.requests.append(req)
            try:
                self.script(conn, req, self)
            except OSError:
                self.saw_disconnect()

    def saw_disconnect(self) -> None:
        if not self.disconnected.is_set():
            self.disconnect_at = time.monotonic()
            self.disconnected.set()

    def wait_disconnect(self, conn: socket.socket, timeout: float) -> bool:
        """Block until the client closes its side (FIN or RST) or ``timeout``."""
        r, _, _ = select.select([conn], [], [], timeout)
        if r:
            try:
                gone = conn.recv(1) == b""
            except OSError:
                gone = True
            if gone:
                self.saw_disconnect()
                return True
        return False

    def close(self) -> None:
        self.sock.close()


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def replay(data: bytes, size: int = 7, end: bool = True, reset: bool = False) -> Script:
    """Send ``data`` in ``size``-byte HTTP chunks; then finish the body, or just close
    (``end=False``), or abort with a TCP RST (``reset=True``)."""

    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        conn.sendall(SSE_HEAD)
        for p in pieces(data, size):
            conn.sendall(chunk(p))
        if reset:
            time.sleep(0.3)  # a RST discards bytes the client has not read yet
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if end:
            conn.sendall(b"0\r\n\r\n")
            srv.wait_disconnect(conn, 2.0)

    return script


def endless(first: bytes = b"", every: float = 0.03) -> Script:
    """Send ``first``, then one content token every ``every`` s until the client goes away."""

    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        conn.sendall(SSE_HEAD + (chunk(first) if first else b""))
        i = 0
        while not srv.wait_disconnect(conn, every):
            ev = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
            conn.sendall(chunk(b"data: " + json.dumps(ev).encode() + b"\n\n"))
            i += 1

    return script


@pytest.fixture
def serve() -> Iterator[Callable[[Script], RawServer]]:
    servers: list[RawServer] = []

    def start(script: Script) -> RawServer:
        s = RawServer(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def run(
    backend: OpenAIBackend, request: GenerationRequest = CHAT, **kw
) -> tuple[list[TokenEvent], FinishEvent]:
    toks: list[TokenEvent] = []
    fin: FinishEvent | None = None
    for ev in backend.stream(request, **kw):
        if isinstance(ev, FinishEvent):
            assert fin is None, "two FinishEvents"
            fin = ev
        else:
            assert fin is None, "token after FinishEvent"
            toks.append(ev)
    assert fin is not None
    return toks, fin


def text(toks: list[TokenEvent]) -> str:
    return "".join(t.text for t in toks)


def sse(*objs: object) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


def delta(content: str, fr: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": fr}]}


# ------------------------------------------------------------------------ SSE parser


def parse_all(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    p = SSEParser()
    out: list[SSEEvent] = []
    prev = 0
    for c in [*sorted(set(cuts)), len(data)]:
        out += p.feed(data[prev:c])
        prev = c
    return out + p.close()


ALL_FIXTURES = sorted(FIX.glob("*.sse"))


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.name)
def test_sse_split_at_every_byte_gives_same_events(path: Path) -> None:
    data = path.read_bytes()
    whole = parse_all(data, [])
    assert whole[-1].data == "[DONE]"
    assert all(e.data == "[DONE]" or json.loads(e.data) for e in whole)
    assert parse_all(data, list(range(1, len(data)))) == whole


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_sse_any_split_and_line_ending(cuts: list[int], eol: str) -> None:
    raw = (FIX / "openai_chat_bytes.sse").read_bytes()
    expected = parse_all(raw, [])
    data = raw.decode("utf-8").replace("\n", eol).encode("utf-8")
    assert parse_all(data, [c % (len(data) + 1) for c in cuts]) == expected


def test_sse_comments_multiline_fields_and_bare_json() -> None:
    data = (
        b"\xef\xbb\xbf: keep-alive\n\n"
        b'event: message\ndata: {"a":\ndata: 1}\nid: 7\nretry: 10\n\n'
        b'data:{"b":2}\n\n'
        b'{"error": "boom: bad"}\n'
        b'event: error\ndata: {"error": {"message": "x"}}\n\n'
        b"data: [DONE]"  # no trailing blank line: still delivered at close
    )
    evs = parse_all(data, [3, 4, 20])
    assert [json.loads(e.data) if e.data != "[DONE]" else e.data for e in evs] == [
        {"a": 1},
        {"b": 2},
        {"error": "boom: bad"},
        {"error": {"message": "x"}},
        "[DONE]",
    ]
    assert evs[2].bare and not evs[0].bare
    assert evs[3].event == "error"


def test_sse_half_event_at_eof_is_dropped() -> None:
    p = SSEParser()
    assert p.feed(b'data: {"choices": [{"de') == []
    assert p.close() == []


def test_fit_texts_follows_server_content() -> None:
    assert fit_texts(["a", "b"], "ab") == ["a", "b"]
    assert fit_texts(["\ufffd", "\ufffd"], "П") == ["", "П"]
    assert fit_texts(["He", "X", "lo"], "Hello") == ["He", "", "llo"]


def test_base_url_normalisation() -> None:
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("h:1/") == "http://h:1/v1"
    assert normalize_base_url("https://x.ai/openai/v1/") == "https://x.ai/openai/v1"


# ----------------------------------------------------------------- recorded streams


@pytest.mark.parametrize("size", [1, 5, 100_000], ids=["byte", "5B", "whole"])
def test_openai_bytes_stream_telemetry_and_request_body(serve, size: int) -> None:
    srv = serve(replay((FIX / "openai_chat_bytes.sse").read_bytes(), size=size))
    b = OpenAIBackend(base_url=srv.url, model="gpt-test", api_key="sk-test")
    req = GenerationRequest(
        messages=(Message("system", "be brief"), Message("user", "Привет 🙂")),
        sampling=Sampling(temperature=0.3, top_p=0.9, top_k=7, seed=5, max_tokens=9, stop=("##",)),
        alternatives=50,
        logit_bias={42: -100.0},
    )
    toks, fin = run(b, req)
    assert fin.reason == "stop" and fin.message == ""
    assert [t.text for t in toks] == ["", "П", "ри", "вет", " ", "🙂"]
    assert "\ufffd" not in text(toks)
    # The token's own bytes are kept, even when they are half a character.
    assert toks[0].bytes == "П".encode()[:1] and toks[1].bytes == "П".encode()[1:]
    assert toks[4].bytes == b" " + "🙂".encode()[:2]
    assert toks[5].logprob is None  # -9999 = not in the top 20
    assert [a.text for a in toks[0].top] == ["<0xD0>", "H"]
    assert [a.logprob for a in toks[5].top] == [-0.7, None]
    assert toks[3].top[1].text == "<empty>"
    assert all(t.entropy is None for t in toks)
    assert fin.usage == {"completion_tokens": 6}
    r = srv.requests[0]
    assert r.path == "/v1/chat/completions"
    assert r.headers["authorization"] == "Bearer sk-test"
    assert r.json() == {
        "stream": True,
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Привет 🙂"},
        ],
        "max_tokens": 9,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 7,
        "seed": 5,
        "stop": ["##"],
        "logit_bias": {"42": -100.0},
        "logprobs": True,
        "top_logprobs": 20,  # alternatives=50 capped at the OpenAI/vLLM ceiling
    }


def test_llamacpp_recorded_chat_stream(serve) -> None:
    srv = serve(replay((FIX / "llamacpp_chat_logprobs.sse").read_bytes(), size=64))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert fin.reason == "length"
    assert text(toks) == "ривет!"  # that server drops the split "П" itself (bytes: null)
    assert len(toks) == 6
    assert all(t.logprob is not None and t.logprob <= 0 for t in toks)
    assert [a.text for a in toks[-1].top] == ["!", " 🙂", "!!"]
    assert "top_k" not in srv.requests[0].json()  # top_k=0 means: do not send


def test_completion_mode_recorded_stream(serve) -> None:
    srv = serve(replay((FIX / "llamacpp_completion_logprobs.sse").read_bytes()))
    b = OpenAIBackend(base_url=srv.url, model="m")
    toks, fin = run(b, GenerationRequest(prompt="The capital of France is", alternatives=2))
    assert fin.reason == "length"
    assert [t.text for t in toks] == [" Paris", ".", "\n", "-"]
    assert toks[0].logprob == pytest.approx(-0.264419287443161)
    # Alternatives sorted most likely first and cut to the number asked for.
    assert [a.text for a in toks[3].top] == ["\n", "-"]
    body = srv.requests[0].json()
    assert srv.requests[0].path == "/v1/completions"
    assert body["prompt"] == "The capital of France is" and body["logprobs"] == 2
    assert "messages" not in body


def test_reasoning_deltas_become_a_think_block(serve) -> None:
    srv = serve(replay((FIX / "vllm_reasoning.sse").read_bytes(), size=11))
    b = OpenAIBackend(base_url=srv.url, model="m")
    toks, fin = run(b)
    assert fin.reason == "length"
    assert text(toks) == "<think>Hmm, easy.</think>Hi!"
    assert toks[0].text == "<think>" and toks[0].logprob is None
    assert toks[5].text == "</think>"
    assert fin.usage == {"completion_tokens": 6}  # markers are not tokens
    srv2 = serve(replay((FIX / "vllm_reasoning.sse").read_bytes(), size=11))
    trace = Generation(OpenAIBackend(base_url=srv2.url, model="m"), CHAT, voices="think").run()
    segs = [(s.voice, s.text) for s in trace.segments]
    assert ("think", "Hmm, easy.") in segs
    assert segs[-1][1] == "Hi!"


def test_plain_deltas_without_logprobs_and_newer_reasoning_field(serve) -> None:
    data = (
        sse(
            {"choices": [{"index": 0, "delta": {"reasoning": "r1"}, "finish_reason": None}]},
            delta("a"),
            delta("b", "stop"),
        )
        + b"data: [DONE]\n\n"
    )
    srv = serve(replay(data))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m", logprobs=False))
    assert fin.reason == "stop"
    assert [t.text for t in toks] == ["<think>", "r1", "</think>", "a", "b"]
    assert all(t.logprob is None and t.top == () for t in toks)
    assert "logprobs" not in srv.requests[0].json()


def test_env_defaults_and_model_discovery(serve, monkeypatch) -> None:
    body = sse(delta("ok", "stop")) + b"data: [DONE]\n\n"

    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        if req.method == "GET":
            j = json.dumps({"data": [{"id": "served-model"}]}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(j), j)
            )
        else:
            replay(body)(conn, req, srv)

    srv = serve(script)
    monkeypatch.setenv("THOUGHTFORM_BASE_URL", srv.url.removesuffix("/v1"))
    monkeypatch.setenv("THOUGHTFORM_API_KEY", "env-key")
    monkeypatch.delenv("THOUGHTFORM_MODEL", raising=False)
    b = create_backend("openai")
    toks, fin = run(b)
    assert text(toks) == "ok" and fin.reason == "stop"
    assert b.model_name == "served-model"
    post = next(r for r in srv.requests if r.method == "POST")
    assert post.json()["model"] == "served-model"
    assert post.headers["authorization"] == "Bearer env-key"
    b.close()


# ------------------------------------------------------------------------- faults

PARTIAL = sse(delta("one "), delta("two "))


def test_error_event_after_200_keeps_partial(serve) -> None:
    err = {"error": {"message": "CUDA out of memory", "type": "server_error", "code": 500}}
    srv = serve(replay(PARTIAL + sse(err)))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert text(toks) == "one two "
    assert fin.reason == "error"
    assert fin.message == "server error: CUDA out of memory"
    assert fin.usage == {"completion_tokens": 2}


def test_ndjson_error_line_keeps_partial(serve) -> None:
    srv = serve(replay(PARTIAL + b'{"error": "model crashed: segfault"}\n'))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert text(toks) == "one two "
    assert (fin.reason, fin.message) == ("error", "server error: model crashed: segfault")


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_connection_lost_mid_stream_keeps_partial(serve, reset: bool) -> None:
    srv = serve(replay(PARTIAL, end=False, reset=reset))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert text(toks) == "one two "
    assert fin.reason == "error"
    assert fin.message.startswith("connection lost after 2 tokens: ")
    assert "\n" not in fin.message


def test_stream_without_done_or_finish_reason_is_an_error(serve) -> None:
    srv = serve(replay(PARTIAL))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert text(toks) == "one two "
    assert (fin.reason, fin.message) == ("error", "stream ended without [DONE] after 2 tokens")


def test_finish_reason_without_done_is_fine(serve) -> None:
    srv = serve(replay(PARTIAL + sse(delta("", "length"))))
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert text(toks) == "one two " and (fin.reason, fin.message) == ("length", "")


@pytest.mark.parametrize(
    ("status", "phrase", "body", "expected"),
    [
        (
            500,
            "Internal Server Error",
            b'{"error": {"message": "model not loaded"}}',
            "HTTP 500 Internal Server Error: model not loaded",
        ),
        (
            401,
            "Unauthorized",
            b'{"error": {"message": "Incorrect API key"}}',
            "HTTP 401 Unauthorized: Incorrect API key",
        ),
        (
            422,
            "Unprocessable Entity",
            b'{"detail": [{"msg": "field required"}]}',
            "HTTP 422 Unprocessable Entity: field required",
        ),
        (
            503,
            "Service Unavailable",
            b"upstream\n down",
            "HTTP 503 Service Unavailable: upstream down",
        ),
    ],
)
def test_http_error_before_first_byte(serve, status, phrase, body, expected) -> None:
    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        conn.sendall(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, phrase.encode(), len(body), body)
        )

    srv = serve(script)
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert toks == []
    assert (fin.reason, fin.message) == ("error", expected)


def test_connection_refused_is_one_clear_line() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    toks, fin = run(OpenAIBackend(base_url=f"http://127.0.0.1:{port}", model="m"))
    assert toks == [] and fin.reason == "error"
    assert fin.message.startswith(f"cannot connect to http://127.0.0.1:{port}/v1")


def test_slow_first_token_times_out_and_hangs_up(serve) -> None:
    role = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})

    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        conn.sendall(SSE_HEAD + chunk(b": ping\n\n" + role))  # bytes, but no token
        if not srv.wait_disconnect(conn, 5.0):
            conn.sendall(chunk(sse(delta("late"))))

    srv = serve(script)
    t0 = time.monotonic()
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m", first_token_timeout=0.5))
    assert toks == []
    assert (fin.reason, fin.message) == ("error", "no token within 0.5 s")
    assert 0.45 < time.monotonic() - t0 < 2.0
    assert srv.disconnected.wait(2.0), "the server never saw the client hang up"


def test_slow_headers_also_time_out(serve) -> None:
    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        srv.wait_disconnect(conn, 1.5)

    srv = serve(script)
    t0 = time.monotonic()
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m", first_token_timeout=0.5))
    assert toks == [] and (fin.reason, fin.message) == ("error", "no token within 0.5 s")
    assert time.monotonic() - t0 < 1.4


def test_cancel_event_stops_and_closes_connection(serve) -> None:
    srv = serve(endless())
    cancel = threading.Event()
    toks: list[TokenEvent] = []
    fin: FinishEvent | None = None
    for ev in OpenAIBackend(base_url=srv.url, model="m").stream(CHAT, cancel):
        if isinstance(ev, FinishEvent):
            fin = ev
            break
        toks.append(ev)
        if len(toks) == 3:
            cancel.set()
            t_cancel = time.monotonic()
    assert fin is not None and fin.reason == "cancelled"
    assert text(toks) == "w0 w1 w2 "  # the partial reply is kept, nothing after the cancel
    assert srv.disconnected.wait(2.0)
    assert srv.disconnect_at is not None and srv.disconnect_at - t_cancel < 1.0


def test_cancel_while_waiting_for_bytes(serve) -> None:
    srv = serve(endless(every=10.0))  # the next token is far away
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"), cancel=cancel)
    assert toks == [] and fin.reason == "cancelled"
    assert time.monotonic() - t0 < 1.5
    assert srv.disconnected.wait(2.0)


def test_closing_the_generator_closes_the_connection(serve) -> None:
    srv = serve(endless())
    gen = OpenAIBackend(base_url=srv.url, model="m").stream(CHAT)
    got = [next(gen) for _ in range(3)]
    assert all(isinstance(t, TokenEvent) for t in got)
    t0 = time.monotonic()
    gen.close()
    assert srv.disconnected.wait(2.0), "the server never saw the client disconnect"
    assert srv.disconnect_at is not None and srv.disconnect_at - t0 < 1.0


def test_completion_mode_rejects_chat_messages() -> None:
    b = OpenAIBackend(base_url="http://127.0.0.1:9", model="m", mode="completion")
    toks, fin = run(b)
    assert toks == [] and fin.reason == "error" and "needs a prompt" in fin.message
    assert b.capabilities.chat is False and b.capabilities.logprobs is True


def test_non_streaming_json_reply_is_accepted(serve) -> None:
    reply = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "whole"},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    body = json.dumps(reply, indent=2).encode()  # pretty-printed: not one line

    def script(conn: socket.socket, req: Req, srv: RawServer) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    srv = serve(script)
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"))
    assert text(toks) == "whole" and toks[0].logprob is None
    assert fin.reason == "length" and fin.usage["completion_tokens"] == 1


def test_cancel_before_start_sends_nothing(serve) -> None:
    srv = serve(endless())
    cancel = threading.Event()
    cancel.set()
    toks, fin = run(OpenAIBackend(base_url=srv.url, model="m"), cancel=cancel)
    assert toks == [] and fin.reason == "cancelled"
    time.sleep(0.1)
    assert srv.requests == []
