"""Test helper: a toy language model behind an OpenAI-compatible HTTP server.

The "model" is a handful of scripted replies (token pieces with weights). The distribution of
the next piece after some reply text is the weighted mix of the scripts that agree with that
text at a piece boundary; when none agrees the model ends the reply. It samples greedily at
temperature 0 and from a seeded RNG otherwise, honours ``logit_bias`` (-100 bans a piece) and
``max_tokens``, and streams ``/v1/completions`` and ``/v1/chat/completions`` with logprobs the
way llama.cpp-style servers do. It also answers the probes a steering client makes
(``/v1/models`` with ``owned_by``, ``/props``, ``/tokenize``, ``/extras/tokenize``) as the
server ``kind`` it plays would, and records every request for the tests to inspect.

    with ToyServer(SCRIPTS, prompt="Q:", kind="llama-cpp-python") as srv:
        backend = OpenAIBackend(base_url=srv.url)
"""

from __future__ import annotations

import json
import math
import random
import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EOS = "<eos>"


@dataclass
class ToyModel:
    """Scripted replies (pieces, weight); the vocabulary is every piece seen."""

    scripts: Sequence[tuple[Sequence[str], float]]
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: dict[str, None] = {"\n": None}
        for pieces, _ in self.scripts:
            for p in pieces:
                seen.setdefault(p, None)
        self.vocab = list(seen)

    def dist(self, text: str, banned: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        """Next-piece probabilities after ``text``, most likely first."""
        acc: dict[str, float] = {}
        for pieces, w in self.scripts:
            s = ""
            for p in [*pieces, EOS]:
                if s == text:
                    acc[p] = acc.get(p, 0.0) + w
                    break
                if p == EOS:
                    break
                s += p
                if not text.startswith(s):
                    break
        for b in banned:
            acc.pop(b, None)
        if not acc:
            return [(EOS, 1.0)]
        z = sum(acc.values())
        return sorted(((p, w / z) for p, w in acc.items()), key=lambda x: -x[1])

    def marker_prob(self, text: str, marker: str) -> float:
        """Exact probability that ``marker`` follows ``text`` (brute force over pieces)."""
        if not marker:
            return 1.0
        total = 0.0
        for p, q in self.dist(text):
            if p == EOS:
                continue
            if marker.startswith(p):
                total += q * self.marker_prob(text + p, marker[len(p) :])
            elif p.startswith(marker):
                total += q
        return total

    def tokenize(self, text: str) -> list[int]:
        """Longest-match tokenization over the vocabulary (ids are vocabulary indexes)."""
        out = []
        i = 0
        while i < len(text):
            best = max((p for p in self.vocab if text.startswith(p, i)), key=len, default=text[i])
            if best not in self.vocab:
                self.vocab.append(best)
            out.append(self.vocab.index(best))
            i += len(best)
        return out

    def sample(self, text: str, temperature: float, seed: int, banned: frozenset[str]) -> str:
        d = self.dist(text, banned)
        if temperature <= 0:
            return d[0][0]
        w = [q ** (1.0 / temperature) for _, q in d]
        r = random.Random(f"{seed}:{len(text)}").random() * sum(w)
        for (p, _), x in zip(d, w, strict=True):
            r -= x
            if r <= 0:
                return p
        return d[-1][0]


def _gone(conn: socket.socket) -> bool:
    """Whether the client closed this connection (a FIN or RST is waiting)."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@dataclass
class ToyServer:
    """The toy model served over HTTP on 127.0.0.1 (a context manager)."""

    scripts: Sequence[tuple[Sequence[str], float]]
    prompt: str = "Q:"
    kind: str = "llama-cpp-python"  # which server to play: vllm, llamacpp, llama-cpp-python, openai
    delay: float = 0.0  # seconds between streamed tokens
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    # per generation request (index into generations()): when it came, when its client hung up
    started: list[float] = field(default_factory=list)
    hung_up: dict[int, float] = field(default_factory=dict)
    # per generation request: the earlier streams whose client had not hung up when it came
    open_at_start: list[list[int]] = field(default_factory=list)
    _live: dict[int, socket.socket] = field(default_factory=dict)
    # Handlers run on their own threads: one registers its stream while another lists the open
    # ones ("dictionary changed size during iteration", seen once).
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.model = ToyModel(self.scripts)
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                srv.requests.append(("GET", self.path, {}))
                srv.get(self)

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                srv.requests.append(("POST", self.path, body))
                srv.post(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> ToyServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what the tests read ---------------------------------------------------------------

    def generations(self) -> list[dict[str, Any]]:
        """Bodies of the generation requests, in order."""
        return [b for m, p, b in self.requests if p.endswith("completions")]

    def reply_of(self, body: dict[str, Any]) -> str:
        """The assistant text a request continues."""
        if "prompt" in body:
            assert body["prompt"].startswith(self.prompt)
            return str(body["prompt"][len(self.prompt) :])
        msgs = body["messages"]
        return str(msgs[-1]["content"]) if msgs[-1]["role"] == "assistant" else ""

    # -- HTTP ------------------------------------------------------------------------------

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def get(self, h: BaseHTTPRequestHandler) -> None:
        owned = {"vllm": "vllm", "llamacpp": "llamacpp", "llama-cpp-python": "me"}
        if h.path == "/v1/models":
            self._json(h, {"data": [{"id": "toy", "owned_by": owned.get(self.kind, "someone")}]})
        elif h.path == "/props" and self.kind == "llamacpp":
            self._json(h, {"default_generation_settings": {}, "build_info": "toy"})
        else:
            self._json(h, {"detail": "Not Found"}, 404)

    def post(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        tokenizer = {"/extras/tokenize": ("llama-cpp-python",), "/tokenize": ("vllm", "llamacpp")}
        if h.path in tokenizer:
            if self.kind not in tokenizer[h.path]:
                self._json(h, {"detail": "Not Found"}, 404)
                return
            text = body.get("input") or body.get("content") or body.get("prompt") or ""
            self._json(h, {"tokens": self.model.tokenize(text)})
            return
        if h.path not in ("/v1/completions", "/v1/chat/completions"):
            self._json(h, {"detail": "Not Found"}, 404)
            return
        self.stream(h, body, chat=h.path.endswith("chat/completions"))

    def stream(self, h: BaseHTTPRequestHandler, body: dict[str, Any], chat: bool) -> None:
        with self._lock:
            index = len(self.started)
            self.started.append(time.monotonic())
            self.open_at_start.append([i for i, c in self._live.items() if not _gone(c)])
            self._live[index] = h.connection
        reply = self.reply_of(body)
        banned = frozenset(
            self.model.vocab[int(k)]
            for k, v in (body.get("logit_bias") or {}).items()
            if v <= -100 and int(k) < len(self.model.vocab)
        )
        temp = float(body.get("temperature", 1.0))
        seed = int(body.get("seed") or 0)
        n_top = int(body.get("top_logprobs", 0) if chat else body.get("logprobs") or 0)
        want_lp = bool(body.get("logprobs")) if chat else "logprobs" in body
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        text = reply
        finish = "length"
        try:
            for _ in range(int(body.get("max_tokens", 16))):
                d = self.model.dist(text, banned)
                piece = self.model.sample(text, temp, seed, banned)
                if piece == EOS:
                    finish = "stop"
                    break
                lp = math.log(dict(d)[piece])
                top = [(p, math.log(q)) for p, q in d[:n_top] if p != EOS]
                self._send(h, chat, piece, lp, top, want_lp, None)
                text += piece
                time.sleep(self.delay)
            self._send(h, chat, "", None, [], False, finish)
            h.wfile.write(b"data: [DONE]\n\n")
            h.wfile.flush()
        except OSError:  # the client hung up (the steering client does, to cut a reply)
            self.hung_up[index] = time.monotonic()
        finally:
            with self._lock:
                self._live.pop(index, None)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        chat: bool,
        piece: str,
        lp: float | None,
        top: list[tuple[str, float]],
        want_lp: bool,
        finish: str | None,
    ) -> None:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}}
            if want_lp and lp is not None:
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": piece,
                            "logprob": lp,
                            "bytes": list(piece.encode()),
                            "top_logprobs": [
                                {"token": p, "logprob": q, "bytes": list(p.encode())}
                                for p, q in top
                            ],
                        }
                    ]
                }
        else:
            choice = {"index": 0, "text": piece}
            if want_lp and lp is not None:
                choice["logprobs"] = {
                    "tokens": [piece],
                    "token_logprobs": [lp],
                    "top_logprobs": [dict(top)],
                }
        choice["finish_reason"] = finish
        h.wfile.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        h.wfile.flush()
