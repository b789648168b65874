"""The workbench without the web page: sessions, settings, voices, backends and streaming runs."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import Backend, BackendError, create_backend
from ..backends.base import GenerationRequest, Message
from ..conversation import ChatSettings, backend_options, build_request, steer_plan
from ..generate import Generation
from ..voices import VoiceSet, VoiceSetError, resolve_voice_set, voice_set_from_dict
from .config import ServeConfig, auth_users, db_path
from .fairqueue import FairQueue
from .store import SessionInfo, Store, StoredMessage, valid_session_id
from .stream import Encoder, Run, info_event, payload
from .voice_defaults import defaults_path, load_default_voices, save_default_voices


def backend_names() -> list[str]:
    """Backends Settings offers: the built-ins and every installed entry-point plugin."""
    from ..backends import available_backends

    return available_backends()


BACKENDS = tuple(backend_names())  # as installed when the server started
MAX_PROMPT_CHARS = 100_000
MAX_RESET_MESSAGES = 400  # a reopened session shows at most this many recent messages
YIELD_EVERY_S = 0.03  # how often a streaming reply pushes a payload (tokens are batched)
# Sends that may wait in the fair queue at once (each holds a worker thread while it waits);
# Gradio's own queue holds the rest.
MAX_WAITING_SENDS = 16
WAIT_BEAT_S = 2.0  # a waiting send re-yields this often, so a page that left is noticed


# Session settings no form edits, kept through saves: set by ``thoughtform proxy``'s recorder.
KEPT_SETTINGS = ("recorded", "source")
NEW_TITLE = "New session"  # until the first prompt names the session
VOICE_VECTORS = (
    "seed"  # the vector set sessions use: the shipped one, trained on the embedded model
)


def session_title(prompt: str, limit: int = 60) -> str:
    """A session's name from its first prompt: one line, at most ``limit`` characters."""
    words = " ".join(prompt.split())
    if len(words) <= limit:
        return words or NEW_TITLE
    cut = words[:limit].rsplit(" ", 1)[0] or words[:limit]
    return cut + "…"


class WorkbenchError(ValueError):
    """Something the user asked for cannot be done; the message is shown to them."""


@dataclass
class Tab:
    """What one browser tab shows: the session and how many of its messages it has."""

    sid: str | None = None
    known: int = 0
    version: tuple[int, int, str] | None = None  # the stored session as this tab last drew it

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (kept in ``gr.State``)."""
        d: dict[str, Any] = {"sid": self.sid, "known": self.known}
        if self.version is not None:
            d["version"] = list(self.version)
        return d

    @classmethod
    def of(cls, d: Any) -> Tab:
        """From the state mapping (anything else gives an empty tab)."""
        if isinstance(d, Tab):
            return d
        if isinstance(d, dict) and valid_session_id(d.get("sid")):
            v = d.get("version")
            ver = None
            if isinstance(v, list) and len(v) == 3:
                ver = (int(v[0]), int(v[1]), str(v[2]))
            return cls(sid=d["sid"], known=int(d.get("known") or 0), version=ver)
        return cls()


def _num(d: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    try:
        v = float(d.get(key, default))
    except (TypeError, ValueError):
        return default
    return min(hi, max(lo, v)) if v == v else default


class Workbench:
    """Everything ``serve`` does, callable from tests without a browser."""

    def __init__(self, config: ServeConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store(db_path(config))
        self.default_voices = resolve_voice_set(config.voices)
        self._backends: dict[tuple[Any, ...], Backend] = {}
        self._blocks = threading.Lock()
        self._encoders: OrderedDict[str, tuple[Encoder, int, str]] = OrderedDict()
        self._elock = threading.Lock()
        self._session_locks: dict[str, threading.Lock] = {}
        self.active: dict[str, Run] = {}  # session id -> its streaming run
        self.runs: OrderedDict[str, Run] = OrderedDict()  # recent runs, for gap fetches
        self._run_owner: dict[str, str] = {}  # run id -> the user whose reply it is
        self._waits: dict[str, threading.Event] = {}  # session id -> stop a waiting send
        self.queue = FairQueue(slots=1)
        # With a login, every session belongs to the user who made it and only they see it.
        self.scoped = bool(auth_users(config))
        self._export_dir: Path | None = None

    # -- users ---------------------------------------------------------------------------

    def owner(self, user: str | None) -> str | None:
        """The owner a user's lookups are limited to: None (everything is shared) without
        auth, else the logged-in user (a missing one is refused)."""
        if not self.scoped:
            return None
        if not isinstance(user, str) or not user:
            raise WorkbenchError("log in first")
        return user

    def session_info(self, sid: str | None, user: str | None = None) -> SessionInfo | None:
        """A session the user may see (None for a bad id, another user's or a missing one)."""
        if not sid or not valid_session_id(sid):
            return None
        return self.store.get_session(sid, owner=self.owner(user))

    # -- settings ------------------------------------------------------------------------

    def default_settings(self) -> dict[str, Any]:
        """Settings a new session starts with (from how the server was started)."""
        c = self.config
        # --replay means "instead of a model": it wins over the default backend.
        backend = "replay" if c.replay and c.backend == "llamacpp" else c.backend
        return {
            "backend": backend,
            "model": c.model or "",
            "base_url": c.base_url or "",
            "temperature": 0.7,
            "top_p": 0.95,
            "top_k": 0,
            "max_tokens": int(c.max_tokens),
            "seed": None,
            "alternatives": 5,
            "voice_prompt": bool(c.voice_prompt),
            "system": "",
            # Telemetry switches (Settings; only backends whose capabilities say so).
            "attention": False,
            "logit_lens": False,
            # Steering (legend controls and the Structure switch); see thoughtform.steer.
            "structure": False,
            "muted": [],
            "next_voice": None,
            # Voice vectors (Voices tab): each voice's vector from the shipped set while it
            # speaks, at its voice set's ``vector`` strength (llamacpp, transformers).
            "voice_vectors": False,
        }

    def settings_of(self, info: SessionInfo | None) -> dict[str, Any]:
        """A session's settings over the defaults."""
        s = self.default_settings()
        if info is not None:
            s.update({k: v for k, v in info.settings.items() if k in s or k in KEPT_SETTINGS})
        return s

    def clean_settings(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Validate settings from the page (clamped numbers, known backend)."""
        s = self.default_settings()
        backend = str(raw.get("backend") or s["backend"])
        if backend not in BACKENDS:
            raise WorkbenchError(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)})")
        s["backend"] = backend
        s["model"] = str(raw.get("model") or "").strip()
        s["base_url"] = str(raw.get("base_url") or "").strip()
        s["temperature"] = _num(raw, "temperature", 0.7, 0.0, 5.0)
        s["top_p"] = _num(raw, "top_p", 0.95, 0.0, 1.0)
        s["top_k"] = int(_num(raw, "top_k", 0, 0, 1000))
        s["max_tokens"] = int(_num(raw, "max_tokens", s["max_tokens"], 1, 32768))
        seed = raw.get("seed")
        s["seed"] = int(seed) if isinstance(seed, (int, float)) and seed == seed else None
        s["alternatives"] = int(_num(raw, "alternatives", 5, 0, 20))
        s["voice_prompt"] = bool(raw.get("voice_prompt", True))
        s["system"] = str(raw.get("system") or "")[:20_000]
        s["attention"] = bool(raw.get("attention", False))
        s["logit_lens"] = bool(raw.get("logit_lens", False))
        s["structure"] = bool(raw.get("structure", False))
        s["voice_vectors"] = bool(raw.get("voice_vectors", False))
        muted = raw.get("muted") or []
        s["muted"] = (
            [str(m)[:64] for m in muted if isinstance(m, str)][:64]
            if isinstance(muted, list)
            else []
        )
        nv = raw.get("next_voice")
        s["next_voice"] = str(nv)[:64] if isinstance(nv, str) and nv else None
        return s

    def save_settings(
        self, sid: str, raw: dict[str, Any], user: str | None = None
    ) -> dict[str, Any]:
        """Validate and keep settings with the session."""
        s = self.clean_settings(raw)
        info = self.session_info(sid, user)
        if info is not None:  # not settings the page edits: kept as they are
            s.update({k: v for k, v in info.settings.items() if k in KEPT_SETTINGS})
        self.store.update_session(sid, settings=s, owner=self.owner(user))
        return s

    # -- voices --------------------------------------------------------------------------

    def voices_of(self, info: SessionInfo | None) -> VoiceSet:
        """A session's voice set (the server default until the user edits it)."""
        if info is not None and info.voice_set:
            try:
                return voice_set_from_dict(info.voice_set, source="session voices")
            except VoiceSetError:
                pass
        return self.default_voices

    def set_voices(self, sid: str, voices: VoiceSet, user: str | None = None) -> None:
        """Keep a voice set with the session (the next reset re-parses its replies)."""
        self.store.update_session(sid, voice_set=voices.to_dict(), owner=self.owner(user))
        with self._elock:
            self._encoders.pop(sid, None)

    def _defaults_path(self, user: str | None) -> Path:
        return defaults_path(self.store.path, self.owner(user))

    def set_default_voices(self, voices: VoiceSet, user: str | None = None) -> None:
        """Make ``voices`` the set the user's new sessions start with."""
        try:
            save_default_voices(self._defaults_path(user), voices)
        except OSError as e:
            raise WorkbenchError(f"cannot keep the default voices: {e}") from None

    # -- sessions ------------------------------------------------------------------------

    def new_session(self, title: str = NEW_TITLE, user: str | None = None) -> SessionInfo:
        """Create a session (the user's, with a login) with the default voices and settings."""
        sid = self.store.create_session(
            title=title,
            settings=self.default_settings(),
            owner=self.owner(user) or "",
            voice_set=load_default_voices(self._defaults_path(user)),
        )
        info = self.store.get_session(sid)
        assert info is not None
        return info

    def adopt(self, sid: str, user: str | None = None) -> None:
        """Give a session made outside these methods (an import) to the user."""
        owner = self.owner(user)
        if owner is not None:
            self.store.set_owner(sid, owner)

    def open_session(self, sid: str | None, user: str | None = None) -> SessionInfo:
        """The session ``sid`` (if the user may see it), else their most recent one, else a
        new one."""
        info = self.session_info(sid, user)
        if info is not None:
            return info
        sessions = self.store.list_sessions(owner=self.owner(user))
        return sessions[0] if sessions else self.new_session(user=user)

    def session_choices(
        self, user: str | None = None, recorded_only: bool = False
    ) -> list[tuple[str, str]]:
        """(label, id) pairs for the user's session picker, most recent first (only sessions
        ``thoughtform proxy`` recorded, with ``recorded_only``)."""
        out = []
        for s in self.store.list_sessions(owner=self.owner(user)):
            if recorded_only and s.settings.get("recorded") is not True:
                continue
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.updated))
            # Sessions ``thoughtform proxy`` recorded from another app say so.
            rec = "● Recorded · " if s.settings.get("recorded") is True else ""
            out.append((f"{rec}{s.title} · {s.messages} msg · {when}", s.id))
        return out

    def rename(self, sid: str, title: str, user: str | None = None) -> None:
        """Rename a session (1-200 characters)."""
        title = " ".join(str(title).split())[:200]
        if not title:
            raise WorkbenchError("a session needs a name")
        self.store.update_session(sid, title=title, owner=self.owner(user))

    def delete(self, sid: str, user: str | None = None) -> None:
        """Delete a session (stopping its reply first); another user's is left alone."""
        if self.session_info(sid, user) is None:
            return
        self.stop(sid, user)
        self.store.delete_session(sid, owner=self.owner(user))
        with self._elock:
            self._encoders.pop(sid, None)

    def _lock_for(self, sid: str) -> threading.Lock:
        with self._elock:
            return self._session_locks.setdefault(sid, threading.Lock())

    # -- rendering -----------------------------------------------------------------------

    def _encode_session(self, info: SessionInfo) -> tuple[Encoder, list[list[Any]], int]:
        """Encode a whole session (its replies re-parsed with its voices)."""
        vs = self.voices_of(info)
        enc = Encoder(vs)
        msgs = self.store.messages(info.id)
        recorded = info.settings.get("recorded") is True
        per_msg = [self._encode_message(enc, m, recorded) for m in msgs]
        evs: list[list[Any]] = [
            ["R"],
            enc.voices_event(),
            ["N", info.id, info.title],
            info_event(self.settings_of(info), vs),
        ]
        # A very long session shows its most recent messages (stats still cover all of it).
        skipped = max(0, len(per_msg) - MAX_RESET_MESSAGES)
        if skipped:
            evs.append(["X", skipped])
        for m_evs in per_msg[skipped:]:
            evs += m_evs
        evs.append(enc.stats_event())
        with self._elock:
            self._encoders[info.id] = (enc, len(msgs), vs.to_yaml())
            self._encoders.move_to_end(info.id)
            while len(self._encoders) > 8:
                self._encoders.popitem(last=False)
        return enc, evs, len(msgs)

    def _encode_message(
        self, enc: Encoder, m: StoredMessage, recorded: bool = False
    ) -> list[list[Any]]:
        st = self._status(m, recorded)
        if m.tokens:
            evs, _ = enc.token_message(
                m.id, m.role, st, m.tokens, m.finish, live=recorded and st == "streaming"
            )
            return evs
        evs = enc.text_message(m.id, m.role, st, m.content or "")
        if m.role == "assistant" and m.status != "done" and not (recorded and st == "streaming"):
            msg = (m.finish or {}).get("message", "") or ""
            if st == "interrupted":
                msg = "the server stopped while this reply streamed"
            evs.append(["E", st, str(msg)])
        return evs

    def _status(self, m: StoredMessage, recorded: bool = False) -> str:
        if m.status == "streaming":
            live = any(r.message_id == m.id and not r.done for r in self.active.values())
            # A recorded session is written by the proxy's process: its reply streams there.
            return "streaming" if live or recorded else "interrupted"
        return m.status

    def live_update(self, tab: Tab, user: str | None = None) -> tuple[str, Tab] | None:
        """A fresh view of the tab's session when another process (``thoughtform proxy`` on
        the same database) changed it since the tab drew it; None when nothing changed or
        this server is streaming into it itself."""
        if tab.sid is None or tab.sid in self.active:
            return None
        info = self.session_info(tab.sid, user)
        if info is None:
            return None
        ver = self.store.session_version(info.id)
        if tab.version is None:
            return None if not info.settings.get("recorded") else self._redraw(info, user, ver)
        if ver == tab.version:
            return None
        return self._redraw(info, user, ver)

    def _redraw(
        self, info: SessionInfo, user: str | None, ver: tuple[int, int, str]
    ) -> tuple[str, Tab]:
        pl, tab = self.reset_payload(info.id, user)
        return pl, Tab(tab.sid, tab.known, ver)

    def reset_payload(self, sid: str | None, user: str | None = None) -> tuple[str, Tab]:
        """The full view of a session, and the tab state that goes with it."""
        info = self.open_session(sid, user)
        _, evs, n = self._encode_session(info)
        return payload(info.id, evs, reset=True), Tab(info.id, n)

    def encoder_for(self, info: SessionInfo) -> tuple[Encoder, list[list[Any]] | None, int]:
        """The cached encoder of a session; re-encodes (and returns reset events) if stale."""
        n = self.store.message_count(info.id)
        vs_yaml = self.voices_of(info).to_yaml()
        with self._elock:
            got = self._encoders.get(info.id)
        if got is not None and got[1] == n and got[2] == vs_yaml:
            return got[0], None, n
        enc, evs, n = self._encode_session(info)
        return enc, evs, n

    # -- backends ------------------------------------------------------------------------

    def backend_for(self, s: dict[str, Any]) -> Backend:
        """A backend for these settings (created once, then reused)."""
        name = s["backend"]
        opts: dict[str, Any]
        if name == "replay":
            opts = {
                "path": str(self.replay_path(s.get("model") or "")),
                "rate": self.config.replay_rate,
            }
        else:
            try:
                opts = backend_options(self.chat_settings(s, self.default_voices))
            except BackendError as e:
                raise WorkbenchError(str(e)) from None
        key = (name, *sorted((k, str(v)) for k, v in opts.items()))
        with self._blocks:
            b = self._backends.get(key)
            if b is None:
                try:
                    b = create_backend(name, **opts)
                except BackendError as e:
                    raise WorkbenchError(str(e)) from None
                except (OSError, ValueError, TypeError) as e:
                    raise WorkbenchError(f"backend {name!r}: {e}") from None
                self._backends[key] = b
            return b

    def replay_files(self) -> list[str]:
        """Names of the recordings a ``--replay DIR`` offers (empty for a single file)."""
        d = Path(self.config.replay or "")
        if not self.config.replay or not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))

    def replay_path(self, choice: str) -> Path:
        """The file to replay: the ``--replay`` file, or a file picked by name inside the
        ``--replay`` directory (a name typed into the page can never reach another path)."""
        if not self.config.replay:
            raise WorkbenchError("the replay backend needs serve --replay FILE_OR_DIR")
        root = Path(self.config.replay)
        if not root.is_dir():
            return root
        files = self.replay_files()
        if choice in files:
            return root / choice
        if not choice and files:
            return root / files[0]
        raise WorkbenchError(
            f"no recording {choice[:80]!r} here (choose one of: {', '.join(files)[:300]})"
        )

    def close(self) -> None:
        """Stop replies, release backends and the database."""
        for run in list(self.active.values()):
            run.cancel.set()
            run.join(5)
        with self._blocks:
            for b in self._backends.values():
                try:
                    b.close()
                except Exception:
                    pass
            self._backends.clear()
        self.store.close()
        if self._export_dir is not None:
            import shutil

            shutil.rmtree(self._export_dir, ignore_errors=True)

    # -- chat ----------------------------------------------------------------------------

    def chat_settings(self, s: dict[str, Any], vs: VoiceSet) -> ChatSettings:
        """The library's ChatSettings for a session's settings (steering plan included)."""
        from ..steer import SteerError

        try:
            plan = steer_plan(
                vs,
                next_voice=s.get("next_voice") or None,
                mute=[m for m in s.get("muted") or () if vs.get(str(m)) is not None],
                structure=bool(s.get("structure")),
                voice_vectors=VOICE_VECTORS if s.get("voice_vectors") else None,
            )
        except SteerError as e:
            raise WorkbenchError(str(e)) from None
        return ChatSettings(
            backend=s["backend"],
            model=s.get("model") or None,
            base_url=s.get("base_url") or None,
            temperature=s["temperature"],
            top_p=s["top_p"],
            top_k=s["top_k"],
            seed=s["seed"],
            max_tokens=s["max_tokens"],
            alternatives=s["alternatives"],
            attention=bool(s.get("attention")),
            logit_lens=bool(s.get("logit_lens")),
            voice_prompt=bool(s.get("voice_prompt")),
            system=s.get("system") or "",
            steer=plan,
        )

    def _request(self, info: SessionInfo, vs: VoiceSet, s: dict[str, Any]) -> GenerationRequest:
        history = [
            Message(m.role, m.text)
            for m in self.store.messages(info.id)
            if m.role in ("user", "assistant") and m.text
        ]
        return build_request(self.chat_settings(s, vs), vs, history)

    def _waiting_payload(self, info: SessionInfo, text: str, ahead: int) -> tuple[str, int]:
        """The session, the prompt that waits (not stored yet) and a line with its place in
        the model's queue; and how many stored messages the view has."""
        enc, evs, n = self._encode_session(info)
        stats = evs.pop()
        # Negative ids: these two messages are not in the database.
        evs += enc.text_message(-1, "user", "done", text)
        evs.append(["M", -2, "queue", "waiting", enc.tok_base])
        evs.append(["T", f"waiting: {ahead} ahead", None])
        evs.append(stats)
        return payload(info.id, evs, reset=True), n

    def _wait_turn(self, ticket: int, last: int | None, timeout: float) -> int | None:
        try:
            return self.queue.wait(ticket, last, timeout)
        except LookupError:
            raise WorkbenchError("this reply lost its place in the queue: send it again") from None

    def send(self, tab: Tab, text: str, user: str | None = None) -> Iterator[tuple[str, Tab]]:
        """Add the user's message and stream the reply as payloads (closing it stops the reply).

        The reply first waits its turn in the model's fair queue; while it waits, the payloads
        show the prompt and a line "waiting: N ahead" (nothing is stored until it runs)."""
        if not isinstance(text, str) or not text.strip():
            return
        if len(text) > MAX_PROMPT_CHARS:
            raise WorkbenchError(f"message too long ({len(text)} > {MAX_PROMPT_CHARS} characters)")
        owner = self.owner(user)
        info = self.open_session(tab.sid, user)
        lock = self._lock_for(info.id)
        if not lock.acquire(timeout=30):
            raise WorkbenchError("this session is busy with another reply")
        run: Run | None = None
        ticket: int | None = None
        try:
            s = self.settings_of(info)
            backend = self.backend_for(s)  # bad settings fail before the reply queues
            ticket = self.queue.join(owner or "")
            ahead = self._wait_turn(ticket, None, 0)
            waited = ahead is not None
            if ahead is not None:
                stop = self._waits[info.id] = threading.Event()
                shown = self._waiting_payload(info, text, ahead)
                last: int = ahead
                beat = -WAIT_BEAT_S
                while ahead is not None:
                    if stop.is_set():
                        pl, wait_tab = self.reset_payload(info.id, user)
                        yield pl, wait_tab
                        return
                    if ahead != last:
                        shown, last, beat = self._waiting_payload(info, text, ahead), ahead, -1e9
                    if time.monotonic() - beat >= WAIT_BEAT_S:
                        # Re-yielding now and then also lets Gradio notice a page that left.
                        yield shown[0], Tab(info.id, shown[1])
                        beat = time.monotonic()
                    ahead = self._wait_turn(ticket, last, 0.5)
                # The session may have changed while it waited (settings, voices, deleted).
                fresh = self.session_info(info.id, user)
                if fresh is None:
                    raise WorkbenchError("this session was deleted while the reply waited")
                info = fresh
                s = self.settings_of(info)
                backend = self.backend_for(s)
            vs = self.voices_of(info)
            enc, reset_evs, n = self.encoder_for(info)
            prefix: list[list[Any]] = []
            reset = waited or reset_evs is not None or tab.sid != info.id or tab.known != n
            if reset:
                if reset_evs is None:
                    enc, reset_evs, n = self._encode_session(info)
                prefix = list(reset_evs)
                prefix.pop()  # stats come again at the end of the reply
            umsg = self.store.add_message(info.id, "user", text)
            if n == 0 and info.title == NEW_TITLE:
                # A session is named after its first prompt until the user renames it.
                self.store.update_session(info.id, title=session_title(text))
            prefix += enc.text_message(umsg.id, "user", "done", text)
            request = self._request(info, vs, s)
            if s["backend"] == "replay":
                # A recording plays whole: Max tokens limits what a model generates, not what
                # was recorded (0 = no limit for the replay backend).
                request = dataclasses.replace(
                    request, sampling=dataclasses.replace(request.sampling, max_tokens=0)
                )
            meta = {"backend": s["backend"], "model": s.get("model") or None}
            reply = self.store.add_message(
                info.id, "assistant", None, status="streaming", meta=meta
            )
            prefix.append(enc.message_event(reply.id, "assistant", "streaming"))
            plan = self.chat_settings(s, vs).steer
            if s.get("next_voice"):
                # "next" applies to one reply: the following ones let the model choose again.
                self.store.update_session(info.id, settings={**s, "next_voice": None})
            gen = Generation(backend, request, vs, meta={"session": info.id}, steer=plan)
            run_id = secrets.token_urlsafe(6)
            held = ticket
            # The model is free the moment the reply ends, whenever this generator is closed.
            run = Run(
                run_id,
                gen,
                enc,
                self.store,
                reply.id,
                prefix,
                on_done=lambda _run: self.queue.leave(held),
            )
            self.active[info.id] = run
            self.runs[run_id] = run
            self._run_owner[run_id] = owner or ""
            while len(self.runs) > 16:
                old, _ = self.runs.popitem(last=False)
                self._run_owner.pop(old, None)
            run.start()
            new_tab = Tab(info.id, n + 2)
            sent = 0
            first = True
            while True:
                evs, done = run.wait(sent, 0.25)
                if evs:
                    yield (
                        payload(info.id, evs, reset=first and reset, run=run_id, start=sent),
                        new_tab,
                    )
                    first = False
                    sent += len(evs)
                if done and sent >= len(run.events):
                    # Gradio repeats the last value when the event completes: end on a tiny
                    # payload so that repeat costs nothing.
                    yield payload(info.id, [], run=run_id, start=sent), new_tab
                    break
                if evs:
                    time.sleep(YIELD_EVERY_S)  # let tokens pile up: one payload per batch
        finally:
            self._waits.pop(info.id, None)
            if run is not None:
                if not run.done:
                    run.cancel.set()  # the page went away (or the generator was closed)
                    run.join(10)
                if self.active.get(info.id) is run:
                    del self.active[info.id]
                if run.done:
                    # The cached encoder now includes both new messages: the next send in
                    # this session needs no re-encoding.
                    with self._elock:
                        got = self._encoders.get(info.id)
                        if got is not None and got[0] is run.encoder:
                            self._encoders[info.id] = (got[0], got[1] + 2, got[2])
            if ticket is not None:
                self.queue.leave(ticket)  # (again, harmless) if it never ran or still waited
            lock.release()

    # -- steering ----------------------------------------------------------------------

    def _steer_session(self, sid: str, user: str | None) -> tuple[SessionInfo, VoiceSet]:
        info = self.session_info(sid, user)
        if info is None:
            raise WorkbenchError("no such session")
        return info, self.voices_of(info)

    def set_next_voice(self, sid: str, voice: str | None, user: str | None = None) -> str | None:
        """Make ``voice`` open the next block of the streaming reply, or the next reply;
        returns the voice's declared name (None clears)."""
        info, vs = self._steer_session(sid, user)
        name = None
        if voice:
            v = vs.get(voice)
            if v is None:
                raise WorkbenchError(f"unknown voice {voice[:80]!r}")
            name = v.name
        run = self.active.get(info.id)
        conductor = run.gen.conductor if run is not None and not run.done else None
        if conductor is not None and name is not None:
            conductor.set_next_voice(name)
            return name
        s = self.settings_of(info)
        s["next_voice"] = name
        self.store.update_session(info.id, settings=s, owner=self.owner(user))
        return name

    def toggle_mute(self, sid: str, voice: str, user: str | None = None) -> bool:
        """Mute or unmute a voice for this session (and the reply streaming now); returns
        whether it is muted afterwards."""
        info, vs = self._steer_session(sid, user)
        v = vs.get(voice)
        if v is None:
            raise WorkbenchError(f"unknown voice {voice[:80]!r}")
        s = self.settings_of(info)
        muted = [m for m in s.get("muted") or [] if m != v.name]
        now = v.name not in (s.get("muted") or [])
        if now:
            muted.append(v.name)
        s["muted"] = muted
        if now and s.get("next_voice") == v.name:
            s["next_voice"] = None
        self.store.update_session(info.id, settings=s, owner=self.owner(user))
        run = self.active.get(info.id)
        if run is not None and not run.done and run.gen.conductor is not None:
            run.gen.conductor.set_muted(v.name, now)
        return now

    def stop(self, sid: str | None, user: str | None = None) -> bool:
        """Stop the session's streaming (or waiting) reply now; True when there was one."""
        if self.session_info(sid, user) is None:
            return False
        waiting = self._waits.get(sid or "")
        if waiting is not None:
            waiting.set()
            return True
        run = self.active.get(sid or "")
        if run is None or run.done:
            return False
        run.cancel.set()
        return True

    def run_events(self, run_id: str, a: int, b: int, user: str | None = None) -> list[list[Any]]:
        """Events ``a``..``b`` of a recent run of this user's (for a browser that missed a
        payload)."""
        owner = self.owner(user)
        run = self.runs.get(str(run_id))
        if run is None or (owner is not None and self._run_owner.get(str(run_id)) != owner):
            return []
        return run.events_between(int(a), int(b))

    # -- attention -----------------------------------------------------------------------

    def attention(self, sid: str, index: int, user: str | None = None) -> dict[str, Any] | None:
        """Where global token ``index`` attended, per layer, labelled for display (only in a
        session the user may see)."""
        info = self.session_info(sid, user)
        if info is None:
            return None
        vs = self.voices_of(info)
        enc = Encoder(vs)
        for m in self.store.messages(info.id):
            if not m.tokens:
                continue
            base = enc.tok_base
            if not base <= index < base + len(m.tokens):
                enc.tok_base += len(m.tokens)
                continue
            _, gen = enc.token_message(m.id, m.role, m.status, m.tokens, m.finish)
            tok = m.tokens[index - base]
            att = tok.attention
            lens = [str(x) for x in tok.lens] if tok.lens else None
            if att is None:
                return {"index": index, "text": tok.text, "layers": [], "lens": lens}
            segs = gen.trace.segments
            toks = gen.trace.tokens
            layers = []
            for li in range(len(att.segment_mass)):
                seg_rows = []
                for si, mass in att.segment_mass[li]:
                    if 0 <= si < len(segs):
                        sg = segs[si]
                        seg_rows.append(
                            [
                                f"#{si} {sg.voice}",
                                sg.voice,
                                enc.colors.color(sg.voice),
                                mass,
                                sg.text[:80],
                            ]
                        )
                    else:
                        seg_rows.append([f"#{si}", "", "#777777", mass, ""])
                top_rows = []
                for pos, w in att.top[li] if li < len(att.top) else []:
                    # ``top`` positions are absolute (prompt + reply): map to reply tokens.
                    ri = att.reply_index(pos)
                    if ri is not None and ri < len(toks):
                        top_rows.append([pos, base + ri, repr(toks[ri].text)[1:-1][:40], w])
                    else:
                        top_rows.append([pos, None, "(prompt)", w])
                prompt = att.prompt_mass[li] if li < len(att.prompt_mass) else None
                layers.append({"segments": seg_rows, "top": top_rows, "prompt": prompt})
            return {"index": index, "text": tok.text, "layers": layers, "lens": lens}
        return None

    # -- files ---------------------------------------------------------------------------

    def export_dir(self) -> Path:
        """Where exported files are written before the page downloads them: a private (0700)
        temporary directory of this server, so other local users cannot read exports."""
        import tempfile

        if self._export_dir is None or not self._export_dir.is_dir():
            self._export_dir = Path(tempfile.mkdtemp(prefix="thoughtform-exports-"))
        return self._export_dir

    def new_export_dir(self) -> Path:
        """A fresh directory inside :meth:`export_dir` for one export: two users exporting
        sessions with the same title at once never get each other's file."""
        import tempfile

        return Path(tempfile.mkdtemp(dir=self.export_dir()))
