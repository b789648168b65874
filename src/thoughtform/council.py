"""The inner chat: a council of voices that take turns as separate speakers.

A :class:`Council` is a voice set, its members (a subset, in order), a policy for who speaks
next, and the user. Each **turn** is one member speaking: a generation whose prompt holds that
voice's persona (its description), the conversation so far -- every earlier turn labelled by its
speaker in the voice set's markers -- and the user's messages (:func:`turn_messages`). The
embedded voices model gets no persona: it was trained without system prompts and knows each voice
by its marker (:func:`wants_persona`).

Policies (:data:`POLICIES`):

* ``list``: members in order, once each after every user message (SillyTavern's *list*).
* ``round-robin``: members in order, repeating.
* ``natural``: SillyTavern's *natural* order. When nobody is queued, the last message activates
  members: first those it names (whole words, in the order they are named), then each other
  member, in shuffled order, with probability ``talkativeness`` (default 0.5); the last speaker
  is barred unless ``allow_self_responses``; if nobody is activated, one random member with
  talkativeness > 0. The activated members speak one after another.
* ``model``: the model chooses. The council transcript is rendered in markers as the open
  assistant reply (:func:`next_speaker_context`) and every eligible member's marker is scored as
  its continuation (``backend.score_continuations``, exact multi-token log-probabilities on
  llama.cpp); the probabilities, renormalised over the eligible members to sum 1, are recorded
  on the turn, and the speaker is sampled from them with the council's seeded generator (or the
  argmax, ``model_choice="argmax"``).
* ``manual``: the user picks each turn (a ``chooser`` callback; None stops the council).

Each member speaks through the shared backend unless its voice names one of its own (voice-set
fields ``backend`` / ``model`` / ``base_url`` / ``adapter``): :func:`member_backends` opens one
backend per distinct binding, and every turn records the backend and model it ran on.

Muted members never speak; :meth:`Council.force_next` makes a member speak next whatever the
policy; :meth:`Council.say` lets the user speak as themself or as any voice (their text becomes
that voice's turn).

How a turn's text is cut from the generation (:class:`TurnCutter`): on a backend with token
control (llama.cpp) the conductor opens the speaker's marker and ends the reply at the next
voice boundary (``Structure(min_blocks=1, max_blocks=1, first=speaker)``). Everywhere else the
reply is parsed: text before any marker, or in the speaker's own block, is the turn; the turn ends
at the first other marker after it (finish ``cut``); blocks of other voices before the speaker's
own are skipped (counted as ``skipped``). A marker of the speaker itself, or a ``Name:`` label,
that the model writes at the start is stripped and counted (``echoed``): turn text never holds
the voice's own marker.

The council trace is one :class:`~thoughtform.trace.Trace`: a ``turn`` record opens each turn,
its token records carry ``turn``, a ``turn_end`` record closes it (text, finish, token span).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from .backends.base import Backend, BackendError, GenerationRequest, Message, Sampling
from .conversation import ChatSettings, voice_settings
from .generate import Generation
from .parse import Event, Text, VoiceEnd, VoiceStart
from .steer import SteerPlan, Structure
from .trace import TokenRecord, Trace, TraceWriter, turn_end_record, turn_record
from .voices import VoiceSet, resolve_voice_set

__all__ = [
    "POLICIES",
    "USER",
    "Council",
    "CouncilError",
    "CouncilEvent",
    "Turn",
    "TurnCutter",
    "continuation_scorer",
    "history_messages",
    "marker_leaks",
    "member_backends",
    "next_speaker_context",
    "persona_prompt",
    "renormalise",
    "surprisal_fn",
    "transcript",
    "turn_messages",
    "turns_of",
    "wants_persona",
]

Policy = Literal["list", "round-robin", "natural", "model", "manual"]
POLICIES: tuple[str, ...] = ("list", "round-robin", "natural", "model", "manual")
DEFAULT_TALKATIVENESS = 0.5  # SillyTavern's default
DEFAULT_TURN_TOKENS = 96
# The user as a speaker in resonance matrices; parentheses cannot occur in a voice name.
USER = "(user)"

_WORDS = re.compile(r"[^\W_]+", re.UNICODE)


class CouncilError(ValueError):
    """A council that cannot be built or run as asked (unknown member, nobody may speak)."""


# ------------------------------------------------------------------------------- turns


@dataclass
class Turn:
    """One turn: a member speaking (generated, or written by the user as that voice), or the
    user speaking as themself (``voice`` None)."""

    index: int
    voice: str | None
    text: str = ""
    by: str = "user"  # who chose the speaker: model | rule | user | forced
    policy: str = ""
    probs: dict[str, float] = field(default_factory=dict)
    source: str = "model"  # model: generated; user: written by the user
    start: int = 0  # token span [start, end) in the council trace
    end: int = 0
    echoed: int = 0  # own markers / name labels the model wrote at the start (stripped)
    skipped: int = 0  # blocks of other voices the model wrote before its own (dropped)
    finish: str = ""  # stop | length | cut | cancelled | error | "" (not finished)
    message: str = ""
    backend: str | None = None
    model: str | None = None
    # Attention resonance: where each earlier turn sits in this turn's prompt, as
    # [turn index, first position, end position) (only where the backend reports positions).
    context: list[list[int]] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        """Whether the turn was stopped (or failed) before it finished."""
        return self.finish in ("", "cancelled", "error")

    @property
    def speaker(self) -> str:
        """The voice, or :data:`USER` for the user as themself."""
        return self.voice if self.voice is not None else USER

    def open_record(self) -> dict[str, Any]:
        """The fields of the ``turn`` record that opens this turn."""
        d: dict[str, Any] = {
            "index": self.index,
            "voice": self.voice,
            "policy": self.policy,
            "probs": {k: round(v, 6) for k, v in self.probs.items()},
            "by": self.by,
            "source": self.source,
            "start": self.start,
        }
        if self.backend is not None:
            d["backend"] = self.backend
            d["model"] = self.model
        if self.context:
            d["context"] = self.context
        return d

    def end_record(self) -> dict[str, Any]:
        """The fields of the ``turn_end`` record that closes this turn."""
        return {
            "text": self.text,
            "finish": self.finish,
            "message": self.message,
            "interrupted": self.interrupted,
            "tokens": [self.start, self.end],
            "echoed": self.echoed,
            "skipped": self.skipped,
        }

    def to_dict(self) -> dict[str, Any]:
        """The turn as stored in :attr:`Trace.turns` (end fields under ``end`` once done)."""
        d = self.open_record()
        if self.finish:
            d["end"] = self.end_record()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Turn:
        """Inverse of :meth:`to_dict` (an unfinished turn has no ``end``)."""
        end = d.get("end") if isinstance(d.get("end"), Mapping) else {}
        assert isinstance(end, Mapping)
        span = end.get("tokens") if isinstance(end.get("tokens"), list) else None
        probs = d.get("probs") if isinstance(d.get("probs"), Mapping) else {}
        assert isinstance(probs, Mapping)
        voice = d.get("voice")
        start = int(d.get("start") or 0)
        return cls(
            index=int(d["index"]),
            voice=voice if isinstance(voice, str) else None,
            text=str(end.get("text") or ""),
            by=str(d.get("by") or "user"),
            policy=str(d.get("policy") or ""),
            probs={str(k): float(v) for k, v in probs.items() if isinstance(v, (int, float))},
            source=str(d.get("source") or "model"),
            start=int(span[0]) if span else start,
            end=int(span[1]) if span else start,
            echoed=int(end.get("echoed") or 0),
            skipped=int(end.get("skipped") or 0),
            finish=str(end.get("finish") or ""),
            message=str(end.get("message") or ""),
            backend=d.get("backend") if isinstance(d.get("backend"), str) else None,
            model=d.get("model") if isinstance(d.get("model"), str) else None,
            context=[list(map(int, c)) for c in d.get("context") or [] if isinstance(c, list)],
        )


@dataclass
class CouncilEvent:
    """What a running council did: a turn opened (``turn``), text was added to it (``text``,
    ``delta`` may be empty for a token that added none), or it ended (``end``)."""

    kind: Literal["turn", "text", "end"]
    turn: Turn
    delta: str = ""
    token: TokenRecord | None = None


# --------------------------------------------------------------------------- prompts


def transcript(turns: Iterable[Turn], voices: VoiceSet) -> str:
    """Voice turns rendered in the voice set's markers, ``[Name]\\ntext`` blocks a blank line
    apart (tag voices as ``<name>\\ntext\\n</name>``); the user's own turns are left out."""
    blocks = []
    for t in turns:
        if t.voice is None:
            continue
        v = voices.voice(t.voice)
        body = t.text.strip()
        blocks.append(
            f"{v.open_marker}\n{body}\n{v.close_marker}"
            if v.syntax == "tag"
            else f"{v.open_marker}\n{body}"
        )
    return "\n\n".join(blocks)


def history_messages(turns: Sequence[Turn], voices: VoiceSet) -> list[Message]:
    """The conversation as chat messages: the user's own turns as user messages, each run of
    voice turns between them as one assistant message in markers."""
    out: list[Message] = []
    run: list[Turn] = []
    for t in turns:
        if t.voice is None:
            if run:
                out.append(Message("assistant", transcript(run, voices)))
                run = []
            out.append(Message("user", t.text))
        else:
            run.append(t)
    if run:
        out.append(Message("assistant", transcript(run, voices)))
    return out


def persona_prompt(voices: VoiceSet, members: Sequence[str], speaker: str) -> str:
    """The system prompt of ``speaker``'s turn: who it is (its description), who else speaks,
    and that it speaks only as itself."""
    v = voices.voice(speaker)
    others = [m for m in members if m != speaker]
    desc = v.description.strip() or f"{v.name} speaks in its own way."
    lines = [
        f"You are {v.name}, one inner voice in a conversation"
        + (f" with {', '.join(others)}." if others else "."),
        desc,
        f"Speak only as {v.name}: one short paragraph in {v.name}'s manner that answers what "
        f"was just said. Begin with {v.open_marker} on its own line and write no other voice.",
    ]
    return "\n".join(lines)


def turn_messages(
    voices: VoiceSet,
    members: Sequence[str],
    speaker: str,
    turns: Sequence[Turn],
    system: str | None = None,
    persona: bool = True,
) -> tuple[Message, ...]:
    """The chat messages of ``speaker``'s next turn: its persona (plus ``system``) as the system
    message, then the conversation so far (:func:`history_messages`). Without ``persona`` (see
    :func:`wants_persona`) only ``system``, if any, comes first."""
    parts = [persona_prompt(voices, members, speaker)] if persona else []
    if system:
        parts.append(system)
    head = (Message("system", "\n\n".join(parts)),) if parts else ()
    return (*head, *history_messages(turns, voices))


def wants_persona(backend: Backend) -> bool:
    """Whether a member on ``backend`` gets its persona as a system prompt: yes, except on the
    embedded voices model, which was trained without system prompts and knows each voice by its
    marker (the conductor opens it). Measured with ``eval council`` on its first 8 prompts (64
    turns, the adapter of commit c29b9e8): in character 0.58 with the persona, 0.83 without --
    the same rule as the conversation layer's voice prompt (thoughtform.conversation)."""
    from .models import EMBEDDED_VOICES

    return getattr(backend, "model_name", None) != EMBEDDED_VOICES


def next_speaker_context(
    voices: VoiceSet, turns: Sequence[Turn], system: str | None = None
) -> tuple[tuple[Message, ...], str]:
    """Who speaks next is read from the model as the next marker of a reply written in voices:
    the messages up to the last user message, and the voice turns since then rendered in markers
    as the open reply (the prefix the markers continue, ending in a blank line)."""
    last_user = max((i for i, t in enumerate(turns) if t.voice is None), default=-1)
    msgs = history_messages(turns[: last_user + 1], voices)
    if system:
        msgs.insert(0, Message("system", system))
    tail = transcript(turns[last_user + 1 :], voices)
    return tuple(msgs), (tail + "\n\n" if tail else "")


def marker_leaks(text: str, voices: VoiceSet, speaker: str | None) -> list[str]:
    """Markers of declared voices other than ``speaker`` found anywhere in ``text``
    (``[Name]``, ``[/Name]``, ``<name>``, ``</name>``; names and aliases, any case)."""
    low = text.casefold()
    out = []
    for v in voices.voices:
        if speaker is not None and v.name == speaker:
            continue
        for key in (v.name, *v.aliases):
            k = key.casefold()
            pats = (f"<{k}>", f"</{k}>") if v.syntax == "tag" else (f"[{k}]", f"[/{k}]")
            if any(p in low for p in pats):
                out.append(v.name)
                break
    return out


# ------------------------------------------------------------------------- scoring


class ContinuationScorer(Protocol):
    """Log-probability of each text continuing the request's prompt followed by ``prefix``."""

    def __call__(
        self, request: GenerationRequest, texts: Sequence[str], prefix: str = ""
    ) -> list[float]:
        """One total log-probability (nats) per text."""
        ...


def continuation_scorer(backend: Backend) -> ContinuationScorer | None:
    """How ``backend`` scores continuations: its own ``score_continuations`` (llama.cpp, or any
    backend that has one), a forward pass on the transformers backend, else None."""
    own = getattr(backend, "score_continuations", None)
    if callable(own):
        return own
    if getattr(backend, "name", "") == "transformers" and hasattr(backend, "encode_prompt"):
        return _TransformersScorer(backend)
    return None


class _TransformersScorer:
    """Continuation log-probabilities from one forward pass of a transformers model."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __call__(
        self, request: GenerationRequest, texts: Sequence[str], prefix: str = ""
    ) -> list[float]:
        """Total log-probability of each text after the prompt and ``prefix``."""
        import torch

        b = self.backend
        tok = b.tokenizer
        ctx = list(b.encode_prompt(request))
        ctx += list(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else []
        out: list[float] = []
        with b._lock, torch.no_grad():
            for text in texts:
                ids = list(tok(text, add_special_tokens=False)["input_ids"])
                if not ids:
                    out.append(0.0)
                    continue
                x = torch.tensor([ctx + ids], device=b.model.device)
                logits = b.model(input_ids=x).logits[0, len(ctx) - 1 : -1].float()
                lp = torch.log_softmax(logits, -1)
                out.append(float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
        return out


# ------------------------------------------------------------------------- cutting


class TurnCutter:
    """Cuts one turn's text out of a streamed reply, from the parser's events (see the module
    docstring): which text is the speaker's, when the turn is over, what was stripped."""

    def __init__(self, voices: VoiceSet, speaker: str) -> None:
        self.voices = voices
        self.speaker = speaker
        self.main = voices.default_voice
        self.state: Literal["start", "own", "skip", "done"] = "start"
        self.raw = ""  # the turn's text so far, unstripped
        self.echoed = 0
        self.skipped = 0
        self._held = ""  # the start of the text, held while it may be a "Name:" label
        self._label = f"{speaker.casefold()}:"
        self._label_done = False

    @property
    def done(self) -> bool:
        """Whether the turn is over (a later voice began)."""
        return self.state == "done"

    @property
    def text(self) -> str:
        """The turn's text (stripped)."""
        return (self.raw + self._held).strip()

    def feed(self, events: Sequence[Event], forced: bool = False) -> str:
        """Apply one token's parser events; returns the text they added to the turn. ``forced``:
        the token was forced by the conductor (a marker it opened is not an echo)."""
        out = []
        for e in events:
            if self.state == "done":
                break
            if isinstance(e, VoiceStart):
                if not e.marker:
                    continue
                if e.voice == self.speaker:
                    if self.has_text:
                        self.state = "done"
                    else:
                        if not forced:
                            self.echoed += 1
                        self.state = "own"
                elif self.has_text:
                    self.state = "done"
                else:
                    self.skipped += 1
                    self.state = "skip"
            elif isinstance(e, VoiceEnd):
                if e.voice == self.speaker and e.marker and self.has_text:
                    self.state = "done"
                elif self.state == "skip" and e.marker:
                    self.state = "start"  # back in the default voice after a closed block
            elif isinstance(e, Text):
                mine = e.voice == self.speaker or (e.voice == self.main and self.state != "skip")
                if mine and self.state in ("start", "own"):
                    out.append(self._add(e.text))
        return "".join(out)

    @property
    def has_text(self) -> bool:
        """Whether the turn has non-blank text yet."""
        return bool((self.raw + self._held).strip())

    def _add(self, piece: str) -> str:
        if self._label_done:
            self.raw += piece
            return piece if self.raw.strip() else ""
        self._held += piece
        head = self._held.lstrip()
        low = head.casefold()
        if low.startswith(self._label):
            self.echoed += 1
            self._label_done = True
            self._held = ""
            return self._add(head[len(self._label) :].lstrip())
        if head and not self._label.startswith(low):
            self._label_done = True
            self.raw = head
            self._held = ""
            return head
        return ""

    def flush(self) -> str:
        """The end of the reply: text still held back (a label that never completed)."""
        if self._label_done or not self._held.strip():
            return ""
        self._label_done = True
        self.raw = self._held.lstrip()
        self._held = ""
        return self.raw


# ------------------------------------------------------------------------- the council


Chooser = Callable[["Council", list[str]], "str | None"]
# Opens the backend for a member's settings; whoever passes it owns (and closes) what it opens.
Opener = Callable[[ChatSettings], Backend]


def _binding_key(s: ChatSettings) -> tuple[str, str | None, str | None, str | None]:
    return (s.backend, (s.model or "").strip() or None, s.base_url or None, s.adapter or None)


def member_backends(
    voices: VoiceSet,
    members: Iterable[str],
    settings: ChatSettings,
    open_backend: Opener,
    default: Backend | None = None,
) -> dict[str, Backend]:
    """The backend of each member whose voice names its own (voice-set ``backend:``, see
    :func:`thoughtform.conversation.voice_settings`): ``open_backend`` is called once per
    distinct binding; a binding that comes out the same as ``settings`` gets ``default``.
    Members without a binding are left out: they speak through the shared backend. A binding
    that cannot be opened raises CouncilError naming the voice (what was opened before it
    stays with the caller, who owns it)."""
    out: dict[str, Backend] = {}
    opened: dict[tuple[str, str | None, str | None, str | None], Backend] = {}
    shared = _binding_key(settings)
    for m in members:
        v = voices.get(m)
        if v is None or v.backend is None:
            continue
        s = voice_settings(settings, v)
        key = _binding_key(s)
        if key == shared and default is not None:
            out[v.name] = default
            continue
        if key not in opened:
            try:
                opened[key] = open_backend(s)
            except (BackendError, ValueError, OSError) as e:
                line = " ".join(str(e).split())[:300]
                raise CouncilError(f"voice {v.name} (backend: {v.backend}): {line}") from None
        out[v.name] = opened[key]
    return out


class Council:
    """A voice set, members in order, a policy, one or more backends, and the turns so far.

    Iterate :meth:`run` (or :meth:`step`) to get :class:`CouncilEvent` s; :meth:`stop`,
    :meth:`force_next` and :meth:`set_muted` are thread-safe and may be called while it runs.
    """

    def __init__(
        self,
        voices: VoiceSet | str | None,
        members: Sequence[str],
        backend: Backend | None = None,
        policy: str = "round-robin",
        *,
        backends: Mapping[str, Backend] | None = None,
        settings: ChatSettings | None = None,
        open_backend: Opener | None = None,
        sampling: Sampling | None = None,
        seed: int | None = None,
        muted: Iterable[str] = (),
        talkativeness: Mapping[str, float] | None = None,
        allow_self_responses: bool = False,
        model_choice: Literal["sample", "argmax"] = "sample",
        chooser: Chooser | None = None,
        scorer: ContinuationScorer | None = None,
        system: str | None = None,
        alternatives: int = 5,
        attention: bool = False,
        trace_path: str | Path | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.voices = resolve_voice_set(voices)
        if policy not in POLICIES:
            raise CouncilError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.policy = policy
        self.members = [self._canon(m, "member") for m in members]
        if not self.members:
            raise CouncilError("a council needs at least one member")
        if len(set(self.members)) != len(self.members):
            raise CouncilError(f"members: a voice is listed twice ({', '.join(self.members)})")
        self.backends: dict[str, Backend] = {
            self._canon(k, "backend for"): v for k, v in (backends or {}).items()
        }
        if open_backend is not None:
            # The voice set's own bindings, for members not given a backend explicitly.
            free = [m for m in self.members if m not in self.backends]
            self.backends.update(
                member_backends(
                    self.voices, free, settings or ChatSettings(), open_backend, backend
                )
            )
        missing = [m for m in self.members if m not in self.backends]
        if backend is None and missing:
            raise CouncilError(f"no backend for {', '.join(missing)}")
        self.backend = backend
        self.sampling = sampling or Sampling(max_tokens=DEFAULT_TURN_TOKENS)
        self.seed = seed
        self.rng = random.Random(seed)
        self.muted = {self._canon(m, "muted") for m in muted}
        self.talkativeness = {
            self._canon(k, "talkativeness"): min(1.0, max(0.0, float(v)))
            for k, v in (talkativeness or {}).items()
        }
        self.allow_self_responses = allow_self_responses
        self.model_choice = model_choice
        self.chooser = chooser
        self._scorer = scorer
        self.system = system
        self.alternatives = alternatives
        self.attention = attention
        if policy == "manual" and chooser is None:
            raise CouncilError("policy manual needs a chooser (who speaks next)")
        if policy == "model" and self.scorer() is None:
            raise CouncilError(
                f"policy model: backend {getattr(backend, 'name', '?')!r} cannot score who "
                "speaks next (use llamacpp or transformers)"
            )
        self.turns: list[Turn] = []
        self.trace = Trace(
            meta={
                "kind": "council",
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "members": list(self.members),
                "policy": policy,
                "seed": seed,
                "voices": self.voices.name,
                "voice_set": self.voices.to_dict(),
                "backend": getattr(backend, "name", None),
                "model": getattr(backend, "model_name", None),
                # members on a backend of their own (the voice set's bindings)
                "member_backends": {
                    m: {
                        "backend": getattr(b, "name", None),
                        "model": getattr(b, "model_name", None),
                    }
                    for m, b in self.backends.items()
                    if b is not backend
                },
                "sampling": dataclasses.asdict(self.sampling),
                **dict(meta or {}),
            }
        )
        self._writer = TraceWriter(trace_path, self.trace.meta) if trace_path else None
        self._lock = threading.Lock()
        self._forced: str | None = None
        self._queue: list[str] = []  # natural: activated members still to speak
        self._rr = 0  # round-robin / list position
        self._cancel: threading.Event | None = None
        self._stopped = threading.Event()
        self._posts: list[tuple[str, str | None]] = []  # said while a turn ran: applied after it

    # -- helpers -------------------------------------------------------------------------------

    def _canon(self, name: str, what: str) -> str:
        v = self.voices.get(str(name).strip())
        if v is None:
            known = ", ".join(self.voices.names()) or "none"
            raise CouncilError(f"{what}: unknown voice {name!r} (declared: {known})")
        return v.name

    def backend_for(self, voice: str) -> Backend:
        """The backend a member speaks through."""
        b = self.backends.get(voice) or self.backend
        if b is None:
            raise CouncilError(f"no backend for {voice}")
        return b

    @property
    def n_tokens(self) -> int:
        """Tokens in the council trace so far."""
        return len(self.trace.tokens)

    # -- live controls ------------------------------------------------------------------------

    def force_next(self, name: str | None) -> None:
        """Make ``name`` speak next, whatever the policy (None: back to the policy)."""
        if name is None:
            with self._lock:
                self._forced = None
            return
        v = self._canon(name, "force next")
        if v not in self.members:
            raise CouncilError(f"force next: {v} is not a member ({', '.join(self.members)})")
        with self._lock:
            if v in self.muted:
                raise CouncilError(f"force next: {v} is muted")
            self._forced = v

    def set_muted(self, name: str, muted: bool = True) -> None:
        """Mute (never speaks) or unmute a member."""
        v = self._canon(name, "mute")
        with self._lock:
            (self.muted.add if muted else self.muted.discard)(v)
            if muted and self._forced == v:
                self._forced = None

    def stop(self) -> None:
        """Stop now: the turn in progress ends, kept and marked interrupted; :meth:`run` ends."""
        self._stopped.set()
        c = self._cancel
        if c is not None:
            c.set()

    def eligible(self) -> list[str]:
        """Members who may speak now (in member order): not muted."""
        with self._lock:
            return [m for m in self.members if m not in self.muted]

    # -- the user ------------------------------------------------------------------------------

    def say(self, text: str, as_voice: str | None = None) -> Turn:
        """The user speaks: as themself (a user message) or as ``as_voice`` (that voice's turn)."""
        voice = self._canon(as_voice, "speak as") if as_voice else None
        turn = Turn(
            index=len(self.turns),
            voice=voice,
            text=text.strip(),
            by="user",
            policy=self.policy,
            source="user",
            start=self.n_tokens,
            end=self.n_tokens,
            finish="stop",
        )
        self._open(turn)
        self._close(turn)
        if voice is None:
            self._queue = []  # natural: the user's message activates afresh
            if self.policy == "list":
                self._rr = 0
        return turn

    def post(self, text: str, as_voice: str | None = None) -> None:
        """Like :meth:`say`, from any thread while the council runs: the message joins the
        conversation after the turn in progress (:meth:`run` yields its events then)."""
        if as_voice:
            self._canon(as_voice, "speak as")
        with self._lock:
            self._posts.append((text, as_voice))

    def _drain_posts(self) -> Iterator[CouncilEvent]:
        with self._lock:
            posts, self._posts = self._posts, []
        for text, voice in posts:
            t = self.say(text, voice)
            yield CouncilEvent("turn", t)
            yield CouncilEvent("end", t)

    # -- who speaks next -----------------------------------------------------------------------

    def next_speaker(self) -> tuple[str, dict[str, float], str] | None:
        """(voice, probabilities, by) of the next turn, or None when the policy has nobody
        (``list`` after every member spoke, ``manual`` when the chooser returns None)."""
        with self._lock:
            forced, self._forced = self._forced, None
        if forced is not None and forced not in self.muted:
            return forced, {}, "forced"
        eligible = self.eligible()
        if not eligible:
            raise CouncilError("every member is muted: nobody can speak")
        p = self.policy
        if p == "manual":
            assert self.chooser is not None
            pick = self.chooser(self, eligible)
            if pick is None:
                return None
            v = self._canon(pick, "manual pick")
            if v not in eligible:
                raise CouncilError(f"manual pick: {v} may not speak now")
            return v, {}, "user"
        n = len(self.members)
        if p in ("list", "round-robin"):
            for _ in range(n):
                if p == "list" and self._rr >= n:
                    return None  # everyone had their turn since the user last spoke
                m = self.members[self._rr % n]
                self._rr = self._rr + 1 if p == "list" else (self._rr + 1) % n
                if m in eligible:
                    return m, {}, "rule"
            return None
        if p == "natural":
            while self._queue:
                m = self._queue.pop(0)
                if m in self.eligible():
                    return m, {}, "rule"
            self._queue = self._activate_natural(eligible)
            return (self._queue.pop(0), {}, "rule") if self._queue else None
        last = self.turns[-1].voice if self.turns else None
        if not self.allow_self_responses and len(eligible) > 1 and last in eligible:
            eligible.remove(last)
        probs = self._model_probs(eligible)
        if self.model_choice == "argmax":
            v = max(eligible, key=lambda m: (probs.get(m, 0.0), -eligible.index(m)))
        else:
            v = self.rng.choices(eligible, weights=[probs.get(m, 0.0) for m in eligible])[0]
        return v, probs, "model"

    def _activate_natural(self, eligible: list[str]) -> list[str]:
        """SillyTavern's natural activation (see the module docstring)."""
        last = self.turns[-1] if self.turns else None
        banned = None
        if last is not None and last.voice is not None and not self.allow_self_responses:
            banned = last.voice
        pool = [m for m in eligible if m != banned]
        activated: list[str] = []
        if last is not None and last.text:
            names = {m: {w.casefold() for w in _WORDS.findall(m)} for m in pool}
            for word in (w.casefold() for w in _WORDS.findall(last.text)):
                for m in pool:
                    if word in names[m]:
                        activated.append(m)
                        break
        chatty = []
        shuffled = pool[:]
        self.rng.shuffle(shuffled)
        for m in shuffled:
            t = self.talkativeness.get(m, DEFAULT_TALKATIVENESS)
            if t >= self.rng.random():
                activated.append(m)
            if t > 0:
                chatty.append(m)
        if not activated:
            fallback = chatty or pool or eligible
            activated.append(self.rng.choice(fallback))
        seen: set[str] = set()
        return [m for m in activated if not (m in seen or seen.add(m))]  # type: ignore[func-returns-value]

    def scorer(self) -> ContinuationScorer | None:
        """The continuation scorer of the ``model`` policy (given, or the shared backend's)."""
        if self._scorer is None and self.backend is not None:
            self._scorer = continuation_scorer(self.backend)
        return self._scorer

    def _model_probs(self, eligible: list[str]) -> dict[str, float]:
        score = self.scorer()
        if score is None:
            raise CouncilError(
                f"policy model: backend {getattr(self.backend, 'name', '?')!r} cannot score "
                "who speaks next (use llamacpp or transformers)"
            )
        msgs, prefix = next_speaker_context(self.voices, self.turns)
        request = GenerationRequest(messages=msgs, sampling=self.sampling, alternatives=0)
        lps = score(request, [self.voices.voice(m).open_marker for m in eligible], prefix)
        return renormalise(dict(zip(eligible, lps, strict=True)))

    # -- running ---------------------------------------------------------------------------------

    def run(self, turns: int, pause: threading.Event | None = None) -> Iterator[CouncilEvent]:
        """Run up to ``turns`` member turns (fewer when the policy runs out, :meth:`stop` is
        called, or ``pause`` is set between turns)."""
        self._stopped.clear()
        yield from self._drain_posts()
        for _ in range(max(0, turns)):
            if self._stopped.is_set() or (pause is not None and pause.is_set()):
                return
            pick = self.next_speaker()
            if pick is None or self._stopped.is_set():
                return
            yield from self._turn(*pick)
            yield from self._drain_posts()

    def step(
        self, voice: str | None = None, probs: Mapping[str, float] | None = None, by: str = "forced"
    ) -> Iterator[CouncilEvent]:
        """One turn by ``voice`` (default: whoever the policy picks), streamed as events."""
        self._stopped.clear()
        if voice is None:
            pick = self.next_speaker()
            if pick is None:
                return
            voice, probs, by = pick
        yield from self._turn(voice, probs, by)

    def _turn(
        self, voice: str, probs: Mapping[str, float] | None, by: str
    ) -> Iterator[CouncilEvent]:
        voice = self._canon(voice, "speaker")
        backend = self.backend_for(voice)
        v = self.voices.voice(voice)
        base = self.sampling
        sampling = dataclasses.replace(
            base,
            temperature=v.temperature if v.temperature is not None else base.temperature,
            top_p=v.top_p if v.top_p is not None else base.top_p,
            seed=None if base.seed is None else base.seed + len(self.turns),
        )
        msgs = turn_messages(
            self.voices, self.members, voice, self.turns, self.system, wants_persona(backend)
        )
        request = GenerationRequest(
            messages=msgs,
            sampling=sampling,
            alternatives=self.alternatives,
            attention=self.attention,
        )
        caps = getattr(backend, "capabilities", None)
        plan = SteerPlan(score_voices=False)
        if caps is not None and caps.token_control and v.syntax == "bracket":
            plan = SteerPlan(
                score_voices=False, structure=Structure(min_blocks=1, max_blocks=1, first=voice)
            )
        turn = Turn(
            index=len(self.turns),
            voice=voice,
            by=by,
            policy=self.policy,
            probs=dict(probs or {}),
            source="model",
            start=self.n_tokens,
            end=self.n_tokens,
            backend=getattr(backend, "name", None),
            model=getattr(backend, "model_name", None),
            context=self._context_spans(backend, request) if self.attention else [],
        )
        self._open(turn)
        yield CouncilEvent("turn", turn)
        cancel = threading.Event()
        self._cancel = cancel
        if self._stopped.is_set():
            cancel.set()
        gen = Generation(backend, request, self.voices, steer=plan, cancel=cancel)
        cutter = TurnCutter(self.voices, voice)
        written = 0
        finish = ""
        message = ""
        it = iter(gen)
        try:
            for upd in it:
                if upd.token is not None:
                    delta = cutter.feed(upd.events, forced=upd.token.forced)
                    turn.text = cutter.text
                    for rec in upd.resolved:
                        self._add_token(turn, rec)
                        written += 1
                    yield CouncilEvent("text", turn, delta, upd.token)
                    if cutter.done:
                        finish = "cut"
                        break
                if upd.finish is not None:
                    delta = cutter.feed(upd.events)
                    turn.text = cutter.text
                    if delta:
                        yield CouncilEvent("text", turn, delta)
                    finish, message = upd.finish.reason, upd.finish.message
        except BaseException:
            # Ctrl-C, or the caller closed us: the partial turn is kept, marked interrupted.
            self._finish_turn(turn, gen, it, written, cutter, abort=True)
            raise
        self._finish_turn(turn, gen, it, written, cutter, abort=False)
        tail = cutter.flush()
        if tail:
            yield CouncilEvent("text", turn, tail)
        if cancel.is_set() and finish != "cut":
            finish, message = "cancelled", message or "stopped by the user"
        turn.text = cutter.text
        turn.echoed, turn.skipped = cutter.echoed, cutter.skipped
        turn.finish = finish or "error"
        turn.message = message
        self._close(turn)
        yield CouncilEvent("end", turn)

    def _finish_turn(
        self,
        turn: Turn,
        gen: Generation,
        it: Iterator[Any],
        written: int,
        cutter: TurnCutter,
        abort: bool,
    ) -> None:
        """Close the generation and put its remaining tokens into the council trace; when the
        turn is aborted (Ctrl-C, the caller closed the stream), close its record as cancelled."""
        close = getattr(it, "close", None)
        if close is not None:
            close()
        for rec in gen.trace.tokens[written:]:
            self._add_token(turn, rec)
        self._cancel = None
        if abort and not turn.finish:
            cutter.flush()
            turn.text = cutter.text
            turn.echoed, turn.skipped = cutter.echoed, cutter.skipped
            turn.finish, turn.message = "cancelled", "stopped by the user"
            self._close(turn)

    def _context_spans(self, backend: Backend, request: GenerationRequest) -> list[list[int]]:
        """Where each earlier voice turn's text sits among the prompt's token positions (for
        attention resonance): found in the chat template's text, mapped through the
        tokenizer's character offsets (transformers fast tokenizers only)."""
        tok = getattr(backend, "tokenizer", None)
        if tok is None or not request.is_chat:
            return []
        msgs = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        except Exception:  # slow tokenizers have no offsets: no spans, no attention resonance
            return []
        offsets = enc["offset_mapping"]
        spans: list[list[int]] = []
        pos = 0
        for t in self.turns:
            if not t.text:
                continue
            at = text.find(t.text, pos)
            if at < 0:
                continue
            pos = at + len(t.text)
            toks = [i for i, (a, b) in enumerate(offsets) if b > at and a < pos]
            if toks:
                spans.append([t.index, toks[0], toks[-1] + 1])
        return spans

    def _add_token(self, turn: Turn, rec: TokenRecord) -> None:
        out = dataclasses.replace(rec, index=self.n_tokens, turn=turn.index)
        self.trace.tokens.append(out)
        turn.end = self.n_tokens
        if self._writer is not None:
            self._writer.token(out)

    def _open(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.trace.turns.append(turn.to_dict())
        if self._writer is not None:
            self._writer.record(turn_record(turn.open_record()))

    def _close(self, turn: Turn) -> None:
        self.trace.turns[turn.index] = turn.to_dict()
        if self._writer is not None:
            self._writer.record(turn_end_record(turn.index, turn.end_record()))
            fh = getattr(self._writer, "_fh", None)
            if fh is not None:
                fh.flush()

    def close(self, reason: str = "stop") -> Trace:
        """Finish the council trace (an ``end`` record) and return it."""
        self.trace.finish = {
            "reason": reason,
            "turns": len(self.turns),
            "tokens": self.n_tokens,
        }
        if self._writer is not None:
            self._writer.end(self.trace.finish)
            self._writer = None
        return self.trace

    # -- restoring ------------------------------------------------------------------------------

    @classmethod
    def from_trace(cls, trace: Trace, backend: Backend | None = None, **kw: Any) -> Council:
        """A council that goes on from a council trace (its members, policy, turns, tokens)."""
        from .voices import voice_set_from_dict

        m = trace.meta
        vs = (
            voice_set_from_dict(m["voice_set"], "<trace meta>")
            if isinstance(m.get("voice_set"), dict)
            else resolve_voice_set(m.get("voices"))
        )
        c = cls(
            vs,
            list(m.get("members") or []),
            backend,
            str(kw.pop("policy", m.get("policy") or "round-robin")),
            seed=kw.pop("seed", m.get("seed")),
            **kw,
        )
        c.trace.meta = dict(m)
        c.trace.tokens = list(trace.tokens)
        c.turns = [Turn.from_dict(t) for t in trace.turns]
        c.trace.turns = [t.to_dict() for t in c.turns]
        c._restore_position()
        return c

    def _restore_position(self) -> None:
        """Where list / round-robin go on, from the turns the rule chose."""
        ruled = [t for t in self.turns if t.by == "rule" and t.voice in self.members]
        if self.policy == "round-robin" and ruled:
            self._rr = (self.members.index(ruled[-1].voice or "") + 1) % len(self.members)
        elif self.policy == "list":
            since = 0
            for t in reversed(self.turns):
                if t.voice is None:
                    break
                since += t.by == "rule"
            self._rr = since


def surprisal_fn(
    voices: VoiceSet,
    members: Sequence[str],
    turns: Sequence[Turn],
    scorer: ContinuationScorer,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    system: str | None = None,
    persona: bool = True,
) -> Callable[[int, frozenset[int]], float]:
    """``surprisal(j, removed)``: the mean surprisal (nats per token) of turn ``j``'s text after
    its own prompt (:func:`turn_messages`) and marker, with the turns ``removed`` left out of the
    conversation -- what :func:`thoughtform.resonance.counterfactual_scores` asks for."""
    by_index = {t.index: t for t in turns}

    def surprisal(j: int, removed: frozenset[int]) -> float:
        t = by_index[j]
        if t.voice is None:
            raise CouncilError(f"turn {j} is the user's own: no surprisal")
        ctx = [e for e in turns if e.index < j and e.index not in removed]
        msgs = turn_messages(voices, members, t.voice, ctx, system, persona)
        req = GenerationRequest(messages=msgs, alternatives=0)
        prefix = voices.voice(t.voice).open_marker + "\n"
        lp = scorer(req, [t.text], prefix)[0]
        n = len(tokenize(t.text)) if tokenize is not None else len(t.text.split())
        return -lp / max(1, n)

    return surprisal


def renormalise(logprobs: Mapping[str, float]) -> dict[str, float]:
    """Log-probabilities as probabilities that sum to 1 (uniform when all are -inf)."""
    finite = {k: v for k, v in logprobs.items() if v is not None and math.isfinite(v)}
    if not finite:
        n = len(logprobs)
        return {k: 1.0 / n for k in logprobs} if n else {}
    top = max(finite.values())
    w = {k: (math.exp(finite[k] - top) if k in finite else 0.0) for k in logprobs}
    z = sum(w.values())
    return {k: x / z for k, x in w.items()}


def turns_of(trace: Trace) -> list[Turn]:
    """The turns of a council trace."""
    return [Turn.from_dict(t) for t in trace.turns]
