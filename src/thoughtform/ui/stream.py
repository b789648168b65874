"""The incremental front-end protocol: small event lists the browser appends to its DOM.

The server never re-sends history while a reply streams. Each payload is JSON::

    {"n": nonce, "sid": session, "reset": 0|1, "run": id|null, "from": k, "ev": [event, ...]}

``reset`` payloads rebuild the whole view; ``run`` payloads carry events ``from``..``from+len``
of one reply's log, so a browser that missed one fetches the gap (``Run.events_between``).
Events are short arrays (the first item says which)::

    ["R"]                                                                  clear the view
    ["V", [[name, color, glyph, lane, description], ...], default_voice]   declared voices
    ["N", session_id, title]                                               the session shown
    ["X", count]                                                           older messages not shown
    ["M", message_id, role, status, token_base]                            a message begins
    ["O", voice, color, marker, token|null]                                a voice block opens
    ["T", text, token|null]                                                text for that block
    ["C", marker]                                                          the block closes
    ["K", index, text, voice, logprob, entropy, [[alt, logprob], ...], flags, vector?]
                                          flags: 1 = attention recorded, 2 = logit lens recorded;
                                          vector: [[voice, strength], ...] in force (only if any)
    ["E", status, message, last_token_wall_time?]                          the message ended
    ["W", token|null, [[voice, p], ...], chosen|null, forced, approximate]
                                          who speaks next at a boundary (the model's probability
                                          of each declared voice opening there; voice_choice)
    ["S", [[voice, tokens, mean_logprob, perplexity, mean_entropy], ...], [order, matrix],
          [model_order, model_matrix]]    observed transitions, and the model's own (from W)
    ["I", {"backend", "model", "voices", "examples": [prompt, ...], "muted": [voice, ...],
           "next_voice": voice|null, "structure": bool}]  what is active (empty chat, legend)
    ["!", message]                               an error that belongs to no reply (shown in chat)

Token indices are global to the session (``token_base`` + index in the reply) so lanes share
one axis. Everything here is data: the browser writes it with ``textContent`` only.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..backends.base import FinishEvent
from ..generate import Generation
from ..metrics import entropy as token_entropy
from ..metrics import model_transition_matrix, transition_matrix, voice_stats
from ..parse import Event, Segment, Text, VoiceEnd, VoiceParser, VoiceStart
from ..trace import TokenRecord
from ..voices import VoiceSet
from .colors import VoiceColors
from .store import Store

MAX_ALT_CHARS = 200
# Offered as buttons in an empty chat: short, everyday, each with room for several voices.
EXAMPLE_PROMPTS = (
    "Is the sea blue?",
    "Should I learn the cello at forty?",
    "I keep putting off calling my sister. Why?",
    "What does rain sound like at night?",
)
# What an empty model field means, per backend (shown in the empty chat).
DEFAULT_MODEL_LABEL = {
    "llamacpp": "embedded (SmolLM2-135M)",
    "transformers": "embedded (SmolLM2-135M)",
    "openai": "the server's default",
    "replay": "the first recording",
}
_nonce = itertools.count(1)


def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return round(float(x), nd)


def status_of(reason: str | None) -> str:
    """The message status for a finish reason (``stop``/``length`` end normally)."""
    if reason in ("stop", "length"):
        return "done"
    if reason == "cancelled":
        return "cancelled"
    return "error"


def dumps_payload(payload: dict[str, Any]) -> str:
    """A payload as compact JSON (no NaN: the browser parses it with JSON.parse)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def payload(
    sid: str | None,
    events: list[Any],
    reset: bool = False,
    run: str | None = None,
    start: int = 0,
) -> str:
    """One payload string for the workbench component."""
    return dumps_payload(
        {
            "n": next(_nonce),
            "sid": sid,
            "reset": 1 if reset else 0,
            "run": run,
            "from": start,
            "ev": events,
        }
    )


def info_event(settings: Mapping[str, Any], voices: VoiceSet) -> list[Any]:
    """What the empty chat shows: backend, model and voice set of the session, example prompts."""
    backend = str(settings.get("backend") or "")
    model = str(settings.get("model") or "").strip()
    if not model:
        model = DEFAULT_MODEL_LABEL.get(backend, "the backend's default")
    base = str(settings.get("base_url") or "").strip()
    if backend == "openai" and base:
        model = f"{model} at {base}"
    names = voices.names()
    shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    label = f"{voices.name or 'custom'}: {shown}" if names else f"{voices.name or 'custom'}"
    muted = settings.get("muted")
    nv = settings.get("next_voice")
    return [
        "I",
        {
            "backend": backend,
            "model": model,
            "voices": label,
            "examples": list(EXAMPLE_PROMPTS),
            # Steering state, so the legend's next/mute controls show it after a reload.
            "muted": [str(m) for m in muted if isinstance(m, str)]
            if isinstance(muted, list)
            else [],
            "next_voice": nv if isinstance(nv, str) and nv else None,
            "structure": bool(settings.get("structure")),
        },
    ]


def stored_choices(finish: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The voice_choice records kept with a stored reply (``finish["voice_choices"]``), the
    malformed ones left out (the database is not trusted more than a trace file)."""
    raw = (finish or {}).get("voice_choices")
    if not isinstance(raw, list):
        return []
    return [c for c in raw if isinstance(c, dict) and isinstance(c.get("probs"), dict)]


def with_choices(finish: Mapping[str, Any] | None, choices: Sequence[Mapping[str, Any]]) -> dict:
    """A reply's finish record with its voice_choice records kept in it (for reloads)."""
    out = dict(finish or {})
    if choices:
        out["voice_choices"] = [dict(c) for c in choices]
    return out


def error_event(message: object) -> list[Any]:
    """An error shown as a block in the chat (a reply that could not start, say)."""
    return ["!", str(message)[:4000]]


def ends_in_error(raw: str) -> bool:
    """Whether payload ``raw`` ends a reply with an error (the prompt then goes back in the box).

    Events are JSON arrays; inside model text the quotes would be escaped, so this substring
    only ever matches an ``E`` event."""
    return '["E","error"' in raw


class Encoder:
    """Turns messages, parser events and tokens into protocol events for one session."""

    def __init__(self, voices: VoiceSet) -> None:
        self.voices = voices
        self.colors = VoiceColors(voices)
        self.tok_base = 0  # global index of the next generated token in the session
        self.all_tokens: list[TokenRecord] = []
        self.all_segments: list[Segment] = []
        self.all_choices: list[list[dict[str, Any]]] = []  # voice_choice records, per reply

    def voices_event(self) -> list[Any]:
        """The declared voices, for the legend."""
        vs = self.voices
        rows = [
            [v.name, self.colors.color(v.name), v.glyph, v.lane, v.description]
            for v in sorted(vs.voices, key=lambda v: v.lane)
        ]
        return ["V", rows, vs.default_voice]

    def message_event(self, mid: int, role: str, status: str) -> list[Any]:
        """A message begins (its tokens start at the current token base)."""
        return ["M", mid, role, status, self.tok_base]

    def parser_events(self, events: Iterable[Event], base: int | None) -> list[list[Any]]:
        """Voice starts, text and ends; ``base`` maps reply token indices to global ones."""
        out: list[list[Any]] = []
        for ev in events:
            tok = ev.tokens[0] + base if (base is not None and ev.tokens) else None
            if isinstance(ev, Text):
                out.append(["T", ev.text, tok])
            elif isinstance(ev, VoiceStart):
                out.append(["O", ev.voice, self.colors.color(ev.voice), ev.marker, tok])
            elif isinstance(ev, VoiceEnd):
                out.append(["C", ev.marker])
        return out

    def token_events(self, recs: Iterable[TokenRecord], base: int) -> list[list[Any]]:
        """Resolved tokens with their telemetry (voice known)."""
        out: list[list[Any]] = []
        for t in recs:
            alts = [[a.text[:MAX_ALT_CHARS], _r(a.logprob)] for a in t.top]
            voice = t.voice or self.voices.default_voice
            ev: list[Any] = [
                "K",
                base + t.index,
                t.text,
                voice,
                _r(t.logprob),
                _r(token_entropy(t)),
                alts,
                (1 if t.attention is not None else 0) | (2 if t.lens else 0),
            ]
            if t.vector:  # the lanes mark where a voice vector was active
                ev.append([[str(v)[:MAX_ALT_CHARS], _r(x)] for v, x in t.vector])
            out.append(ev)
            self.all_tokens.append(t)
        return out

    def choice_events(
        self, choices: Iterable[Mapping[str, Any]], base: int | None
    ) -> list[list[Any]]:
        """Who-speaks-next records as ``W`` events (token indices made global with ``base``)."""
        out: list[list[Any]] = []
        for c in choices:
            probs = c.get("probs")
            if not isinstance(probs, Mapping):
                continue
            tok = c.get("token")
            g = base + tok if base is not None and isinstance(tok, int) else None
            pairs = [[str(v), _r(p)] for v, p in probs.items() if _r(p) is not None]
            chosen = c.get("chosen")
            out.append(
                [
                    "W",
                    g,
                    pairs,
                    chosen if isinstance(chosen, str) else None,
                    1 if c.get("forced") else 0,
                    1 if c.get("approximate") else 0,
                ]
            )
        return out

    def model_matrix(self, order: Sequence[str]) -> tuple[list[str], list[list[float]]]:
        """The model's own voice-transition matrix over the session's replies (each reply's
        opening boundary has no voice before it: only its chosen voice is kept)."""
        flat: list[dict[str, Any]] = []
        for reply in self.all_choices:
            for i, c in enumerate(reply):
                flat.append({"chosen": c.get("chosen")} if i == 0 else dict(c))
        return model_transition_matrix(flat, order)

    def stats_event(self) -> list[Any]:
        """Per-voice stats, the observed voice transition matrix and the model's own one, over
        the whole session so far."""
        rows = [
            [s.voice, s.tokens, _r(s.mean_logprob), _r(s.perplexity, 3), _r(s.mean_entropy)]
            for s in voice_stats(self.all_tokens)
        ]
        order, matrix = transition_matrix(self.all_segments)
        m_order, m_matrix = self.model_matrix(order) if self.all_choices else ([], [])
        model = [m_order, [[_r(x) or 0.0 for x in row] for row in m_matrix]]
        return ["S", rows, [order, matrix], model]

    def text_message(self, mid: int, role: str, status: str, text: str) -> list[list[Any]]:
        """A whole message without tokens (user text, imported transcript), parsed into blocks."""
        out: list[list[Any]] = [self.message_event(mid, role, status)]
        parser = VoiceParser(self.voices)
        events = parser.feed(text) + parser.close()
        out += self.parser_events(events, None)
        if role == "assistant":
            from ..parse import SegmentBuilder

            b = SegmentBuilder()
            b.add(events)
            self.all_segments.extend(b.segments)
        return out

    def token_message(
        self,
        mid: int,
        role: str,
        status: str,
        tokens: Sequence[TokenRecord],
        finish: dict[str, Any] | None,
        live: bool = False,
    ) -> tuple[list[list[Any]], Generation]:
        """A stored reply replayed through the same pipeline as a live one (same blocks, voices)."""
        from ..generate import replay_generation

        out: list[list[Any]] = [self.message_event(mid, role, status)]
        base = self.tok_base
        gen = replay_generation(tokens, self.voices)
        for upd in gen:
            out += self.parser_events(upd.events, base)
            out += self.token_events(upd.resolved, base)
        self.tok_base = base + len(tokens)
        self.all_segments.extend(gen.trace.segments)
        choices = stored_choices(finish)
        if choices:
            # After the reply's blocks (live they come as each voice opens): the page places
            # each at its boundary by token index, so the view is the same.
            out += self.choice_events(choices, base)
            self.all_choices.append(choices)
        msg = (finish or {}).get("message", "") if status != "done" else ""
        if status == "streaming" and live:
            return out, gen  # another process is still writing it (thoughtform proxy)
        if status == "streaming":
            status, msg = "interrupted", "the server stopped while this reply streamed"
        out.append(["E", status, str(msg or "")])
        return out, gen


class Run:
    """One reply streaming in a background thread: its event log, and its tokens going to SQLite.

    The log starts with ``prefix`` (whatever the browser must see first); readers wait on it with
    :meth:`wait`. Token rows are written in batches about every ``flush_s`` so a killed server
    loses at most the last batch.
    """

    def __init__(
        self,
        run_id: str,
        generation: Generation,
        encoder: Encoder,
        store: Store,
        message_id: int,
        prefix: list[list[Any]],
        flush_s: float = 0.1,
        on_done: Any = None,
    ) -> None:
        self.id = run_id
        self.gen = generation
        self.encoder = encoder
        self.store = store
        self.message_id = message_id
        self.cancel = generation.cancel
        self.base = encoder.tok_base
        self.events: list[list[Any]] = list(prefix)
        self.done = False
        self.status = "streaming"
        self.error: str | None = None
        self.t_last_token: float | None = None  # wall clock of the last token produced
        self.produced = 0
        self._cond = threading.Condition()
        self._pending: list[TokenRecord] = []
        self._plock = threading.Lock()
        self._flush_s = flush_s
        self._on_done = on_done
        self._thread = threading.Thread(target=self._main, name=f"tf-run-{run_id}", daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="tf-flush", daemon=True)

    def start(self) -> Run:
        """Start generating."""
        self._thread.start()
        self._flusher.start()
        return self

    def _push(self, evs: list[list[Any]]) -> None:
        if not evs:
            return
        with self._cond:
            self.events.extend(evs)
            self._cond.notify_all()

    def _main(self) -> None:
        enc = self.encoder
        base = self.base
        finish: FinishEvent | None = None
        try:
            for upd in self.gen:
                evs: list[list[Any]] = []
                if upd.token is not None:
                    with self._plock:
                        self._pending.append(upd.token)
                    self.produced += 1
                    self.t_last_token = time.time()
                if upd.events:
                    evs += enc.parser_events(upd.events, base)
                if upd.resolved:
                    evs += enc.token_events(upd.resolved, base)
                if upd.choices:
                    evs += enc.choice_events(upd.choices, base)
                if upd.finish is not None:
                    finish = upd.finish
                self._push(evs)
        except BaseException as e:  # keep the partial reply whatever happened
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.flush()
            tr = self.gen.trace
            enc.tok_base = base + len(tr.tokens)
            enc.all_segments.extend(tr.segments)
            if tr.voice_choices:
                enc.all_choices.append(list(tr.voice_choices))
            reason = finish.reason if finish is not None else "error"
            message = finish.message if finish is not None else (self.error or "stream ended")
            self.status = status_of(reason)
            try:
                # The voice choices go with the finish record, so a reloaded reply shows them.
                self.store.finish_message(
                    self.message_id,
                    self.status,
                    with_choices(tr.finish or {"reason": reason}, tr.voice_choices),
                    tr.text,
                )
            except Exception as e:  # the database may be gone; the browser still gets the end
                message = f"{message} (not saved: {e})".strip()
            # The wall-clock time of the last token lets a benchmark measure display lag.
            end = [["E", self.status, message or "", self.t_last_token], enc.stats_event()]
            with self._cond:
                self.events.extend(end)
                self.done = True
                self._cond.notify_all()
            if self._on_done is not None:
                self._on_done(self)

    def _flush_loop(self) -> None:
        while not self.done:
            time.sleep(self._flush_s)
            self.flush()

    def flush(self) -> None:
        """Write the tokens produced since the last flush."""
        with self._plock:
            batch, self._pending = self._pending, []
            if batch:
                try:
                    self.store.append_tokens(self.message_id, batch)
                except Exception as e:
                    self.error = f"saving tokens failed: {e}"

    def wait(self, after: int, timeout: float) -> tuple[list[list[Any]], bool]:
        """Events after index ``after`` (waiting up to ``timeout`` for some) and whether done."""
        with self._cond:
            if len(self.events) <= after and not self.done:
                self._cond.wait(timeout)
            return self.events[after:], self.done

    def events_between(self, a: int, b: int) -> list[list[Any]]:
        """A slice of the log, for a browser that missed a payload."""
        with self._cond:
            return self.events[max(0, a) : max(0, b)]

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reply to end."""
        self._thread.join(timeout)
