"""The conductor: the one path from what the parser sees back into sampling.

Data flows one way (backend -> token events -> parser -> trace); control flows back only through
a :class:`Conductor`. :class:`~thoughtform.generate.Generation` owns it and feeds it every token
and parser event; a backend with token-level control asks it, before each token, what to do
(:meth:`Conductor.step`: a forced token, banned tokens, the sampling in force, the voice vector in
force) and shows it each sampled token (:meth:`Conductor.intercept`), which is where a voice
boundary is noticed: the model has just chosen to open a marker at the start of a line.

What a user asks for is a :class:`SteerPlan` (a pure value: the CLI, the workbench and the proxy
all build one): the next voice, muted voices, per-voice sampling, structure (a reply that always
parses as voice blocks), who-speaks-next scoring and voice-vector strengths.

Marker arithmetic is done on token *text*: a backend binds a :class:`Vocab` (every token's bytes,
the end-of-generation ids and a tokenizer). Bans are computed per "marker state" (the start of a
line, or a marker prefix such as ``[do``) with one pass over the vocabulary, then cached: 49,152
pieces take ~20 ms once, and each later step costs a dictionary lookup.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .parse import Event, VoiceEnd, VoiceStart
from .voices import Voice, VoiceSet

__all__ = [
    "Conductor",
    "LaterFn",
    "ScoreFn",
    "SteerError",
    "SteerPlan",
    "Step",
    "Structure",
    "Vocab",
    "VoiceChoice",
    "parse_order",
    "parse_voice_sampling",
    "structure_gbnf",
]

# score(sequences) -> the log-probability of each token sequence continuing the current context.
ScoreFn = Callable[[Sequence[Sequence[int]]], Sequence[float]]
# later(sequences) -> the same, computed while the reply goes on (None: score now instead). For
# boundaries that only observe: what the model wanted there changes nothing it writes.
LaterFn = Callable[[Sequence[Sequence[int]]], "Future[list[float]] | None"]

MAX_MARKER_STATE = 48  # longest line prefix still treated as a possible marker


class SteerError(ValueError):
    """A steering request that cannot be honoured (unknown voice, bad order rule)."""


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Structure:
    """A reply that always parses: ``min_blocks``..``max_blocks`` voice blocks, each a declared
    marker then text, never the same voice twice in a row, nothing outside voices, each block at
    most ``block_tokens`` tokens (0: derived from the token budget) so the next voice comes in
    time. Order rules: ``first`` voice, voices that may not come first, a cap per voice."""

    min_blocks: int = 2
    max_blocks: int = 0  # 0: as many as there are allowed voices
    block_tokens: int = 0
    first: str | None = None
    never_first: tuple[str, ...] = ()
    max_per_voice: int = 0  # 0: no cap

    def block_budget(self, max_tokens: int) -> int:
        """Tokens one block may take: configured, or the budget shared by the minimum blocks."""
        if self.block_tokens > 0:
            return self.block_tokens
        per = (max(max_tokens, 16) - 8 * self.min_blocks) // max(1, self.min_blocks)
        return max(12, per)


@dataclass(frozen=True)
class SteerPlan:
    """What the user asks of the voices in one generation (names as declared in the set)."""

    next_voice: str | None = None
    mute: frozenset[str] = frozenset()
    # voice -> (temperature, top_p); None keeps the voice set's value (or the request's)
    voice_sampling: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    structure: Structure | None = None
    score_voices: bool = True  # who speaks next at every boundary (where the backend can)
    # voice -> strength of its voice vector while that voice speaks (switched at boundaries)
    vectors: Mapping[str, float] = field(default_factory=dict)
    # voice -> strength of its vector over the whole reply (llama.cpp's --control-vector-scaled)
    whole_vectors: Mapping[str, float] = field(default_factory=dict)
    vector_dir: str | None = None  # a vector directory or shipped set; None: the shipped "seed"

    @property
    def controls(self) -> bool:
        """Whether the plan changes sampling at all (scoring alone only observes)."""
        return bool(
            self.next_voice
            or self.mute
            or self.voice_sampling
            or self.structure
            or self.vectors
            or self.whole_vectors
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (trace metadata, sessions)."""
        return {
            "next_voice": self.next_voice,
            "mute": sorted(self.mute),
            "voice_sampling": {k: list(v) for k, v in self.voice_sampling.items()},
            "structure": None if self.structure is None else self.structure.__dict__.copy(),
            "score_voices": self.score_voices,
            "vectors": dict(self.vectors),
            "whole_vectors": dict(self.whole_vectors),
            "vector_dir": self.vector_dir,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SteerPlan:
        """Inverse of :meth:`to_dict` (unknown keys ignored)."""
        if not d:
            return cls()
        st = d.get("structure")
        vsamp: dict[str, tuple[float | None, float | None]] = {}
        for k, v in (d.get("voice_sampling") or {}).items():
            t, p = [*list(v), None, None][:2] if isinstance(v, (list, tuple)) else (v, None)
            vsamp[str(k)] = (None if t is None else float(t), None if p is None else float(p))
        structure = None
        if isinstance(st, Mapping):
            fields: dict[str, Any] = {
                k: (tuple(v) if k == "never_first" else v)
                for k, v in st.items()
                if k in Structure.__dataclass_fields__
            }
            structure = Structure(**fields)
        elif st:
            structure = Structure()
        return cls(
            next_voice=d.get("next_voice") or None,
            mute=frozenset(str(x) for x in d.get("mute") or ()),
            voice_sampling=vsamp,
            structure=structure,
            score_voices=bool(d.get("score_voices", True)),
            vectors={str(k): float(v) for k, v in (d.get("vectors") or {}).items()},
            whole_vectors={str(k): float(v) for k, v in (d.get("whole_vectors") or {}).items()},
            vector_dir=str(d["vector_dir"]) if d.get("vector_dir") else None,
        )

    def resolved(self, voices: VoiceSet) -> SteerPlan:
        """The plan with every voice name checked against the set and spelled as declared."""

        def canon(name: str, what: str) -> str:
            v = voices.get(name)
            if v is None:
                known = ", ".join(voices.names()) or "none"
                raise SteerError(f"{what}: unknown voice {name!r} (declared: {known})")
            return v.name

        st = self.structure
        if st is not None:
            st = replace(
                st,
                first=canon(st.first, "order first") if st.first else None,
                never_first=tuple(canon(x, "order never-first") for x in st.never_first),
            )
        return replace(
            self,
            next_voice=canon(self.next_voice, "next voice") if self.next_voice else None,
            mute=frozenset(canon(x, "mute") for x in self.mute),
            voice_sampling={canon(k, "voice sampling"): v for k, v in self.voice_sampling.items()},
            structure=st,
            vectors={(k if k == "*" else canon(k, "vector")): v for k, v in self.vectors.items()},
        )


def parse_voice_sampling(specs: Iterable[str]) -> dict[str, tuple[float | None, float | None]]:
    """``NAME=T[,P]`` items (CLI ``--voice-sampling``) as voice -> (temperature, top_p)."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip():
            raise SteerError(f"voice sampling {spec!r}: expected NAME=TEMPERATURE[,TOP_P]")
        parts = [x.strip() for x in rest.split(",")]
        try:
            t = float(parts[0]) if parts[0] else None
            p = float(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            raise SteerError(f"voice sampling {spec!r}: numbers expected") from None
        if t is not None and not 0.0 <= t <= 5.0:
            raise SteerError(f"voice sampling {spec!r}: temperature must be in 0..5")
        if p is not None and not 0.0 < p <= 1.0:
            raise SteerError(f"voice sampling {spec!r}: top_p must be in (0, 1]")
        out[name.strip()] = (t, p)
    return out


def parse_order(specs: Iterable[str], base: Structure | None = None) -> Structure:
    """``--order`` rules (``first=Echo``, ``never-first=Doubt``, ``max-per-voice=1``,
    ``min-blocks=2``, ``max-blocks=4``, ``block-tokens=60``) over a structure."""
    st = base or Structure()
    for spec in specs:
        for item in (x.strip() for x in spec.split(";")):
            if not item:
                continue
            key, sep, val = item.partition("=")
            key = key.strip().lower().replace("_", "-")
            val = val.strip()
            if not sep or not val:
                raise SteerError(f"order rule {item!r}: expected KEY=VALUE")
            if key == "first":
                st = replace(st, first=val)
            elif key == "never-first":
                st = replace(
                    st, never_first=st.never_first + tuple(v.strip() for v in val.split(","))
                )
            elif key in ("max-per-voice", "min-blocks", "max-blocks", "block-tokens"):
                try:
                    n = int(val)
                except ValueError:
                    raise SteerError(f"order rule {item!r}: a whole number expected") from None
                if n < (1 if key == "min-blocks" else 0):
                    raise SteerError(f"order rule {item!r}: out of range")
                changes: dict[str, Any] = {key.replace("-", "_"): n}
                st = replace(st, **changes)
            else:
                raise SteerError(
                    f"order rule {item!r}: unknown rule (first, never-first, max-per-voice,"
                    " min-blocks, max-blocks, block-tokens)"
                )
    if st.max_blocks and st.max_blocks < st.min_blocks:
        raise SteerError("order: max-blocks is smaller than min-blocks")
    return st


# ------------------------------------------------------------------------- GBNF (servers)


def _gbnf_literal(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def structure_gbnf(
    voices: VoiceSet, structure: Structure, mute: Iterable[str] = (), block_chars: int = 0
) -> str:
    """The structure as a GBNF grammar (llama.cpp, llama.cpp server ``grammar``, vLLM
    ``structured_outputs.grammar``): blocks ``[Name]\\n`` + text, no voice twice in a row,
    ``min_blocks``..``max_blocks``, each block's text at most ``block_chars`` characters.
    A cap per voice is not expressible without one rule per subset of voices: token-level
    backends enforce it through the conductor instead."""
    muted = set(mute)
    allowed = [v for v in voices.voices if v.syntax == "bracket" and v.name not in muted]
    if len(allowed) < 2:
        raise SteerError("structure needs at least two voices that are not muted")
    n_max = structure.max_blocks or len(allowed)
    n_min = min(structure.min_blocks, n_max)
    first = [
        v
        for v in allowed
        if (structure.first is None or v.name == structure.first)
        and v.name not in structure.never_first
    ]
    if not first:
        raise SteerError("order: no voice may come first")
    chars = block_chars or 4 * structure.block_budget(256)
    ident = {v.name: f"v{i}" for i, v in enumerate(allowed)}
    rules = [f"root ::= {' | '.join(f'b1-{ident[v.name]}' for v in first)}"]
    # One paragraph: a first character that cannot open a marker, then up to `chars` more.
    rules.append(f"body ::= [^\\n\\[ ] [^\\n]{{0,{chars}}}")
    for k in range(1, n_max + 1):
        for v in allowed:
            head = f"b{k}-{ident[v.name]} ::= {_gbnf_literal(v.open_marker + chr(10))} body"
            if k == n_max:
                rules.append(head)
                continue
            nxt = " | ".join(f"b{k + 1}-{ident[w.name]}" for w in allowed if w.name != v.name)
            tail = f'"\\n\\n" ({nxt})'
            rules.append(f"{head} ({tail}){'?' if k >= n_min else ''}")
    return "\n".join(rules) + "\n"


# ------------------------------------------------------------------------------- vocab


class Vocab:
    """A backend's vocabulary as the conductor needs it: every token's bytes, the end-of-
    generation ids and a tokenizer for marker text. Caches derived tables (one per backend)."""

    def __init__(
        self, pieces: Sequence[bytes], eog: Iterable[int], tokenize: Callable[[str], list[int]]
    ) -> None:
        self.pieces = list(pieces)
        self.texts = [b.decode("utf-8", "replace") for b in self.pieces]
        self.eog = frozenset(int(x) for x in eog)
        self.tokenize = tokenize
        self._cache: dict[Any, Any] = {}
        self._lock = threading.Lock()
        n = len(self.texts)
        # Tokens that can open a bracket marker at a line start (after spaces/tabs) and tokens
        # that hold a line feed followed by '['. Most steps only need these few hundred ids.
        self.bracket_start = np.array(
            [i for i in range(n) if self.texts[i].lstrip(" \t").startswith("[")], dtype=np.intc
        )
        self._bracket_start_set = frozenset(int(i) for i in self.bracket_start)
        nl = re.compile(r"\n[ \t]*\[")
        self.nl_bracket = {i: m.end() - 1 for i in range(n) if (m := nl.search(self.texts[i]))}
        self.newline = frozenset(i for i in range(n) if "\n" in self.texts[i])

    def __len__(self) -> int:
        return len(self.pieces)

    def marker_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (a marker, as written at a line start)."""
        key = ("ids", text)
        got = self._cache.get(key)
        if got is None:
            got = list(self.tokenize(text))
            self._cache[key] = got
        return list(got)

    def opens_marker(self, tok: int, at_line_start: bool) -> int | None:
        """Offset in token ``tok``'s text where a bracket marker would begin, or None."""
        if at_line_start and tok in self._bracket_start_set:
            t = self.texts[tok]
            return len(t) - len(t.lstrip(" \t"))
        return self.nl_bracket.get(tok)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """A derived table, computed once per key."""
        got = self._cache.get(key)
        if got is None:
            with self._lock:
                got = self._cache.get(key)
                if got is None:
                    got = make()
                    self._cache[key] = got
        return got


def _consistent(s: str, markers: Sequence[str]) -> bool:
    """Whether text ``s`` (lowercased, from the marker's first character) is a prefix of one
    of ``markers`` or starts with one of them."""
    return any(m.startswith(s) or s.startswith(m) for m in markers)


def _proper_prefix(s: str, markers: Sequence[str]) -> bool:
    return any(len(s) < len(m) and m.startswith(s) for m in markers)


def _opener_keys(v: Voice) -> list[str]:
    keys = [v.name, *v.aliases]
    if v.syntax == "tag":
        return [f"<{k.lower()}>" for k in keys]
    return [f"[{k.lower()}]" for k in keys]


# -------------------------------------------------------------------------------- steps


@dataclass(slots=True)
class Step:
    """What the backend does for the next token: emit ``force`` (no sampling), or sample with
    ``ban`` masked, ``bias`` added and this temperature / top-p; apply voice vector ``vector``
    (voice, strength) or none."""

    force: int | None = None
    ban: np.ndarray | None = None
    bias: Mapping[int, float] | None = None
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    vector: tuple[tuple[str, float], ...] = ()
    intercept: bool = False  # call Conductor.intercept with the sampled token

    @property
    def steered(self) -> bool:
        """Whether this step changes the model's distribution (not just samples it)."""
        return self.force is not None or self.ban is not None or bool(self.bias)


@dataclass
class VoiceChoice:
    """Who speaks next at one boundary: the model's probability of each declared voice's
    marker (multi-token, exact under the marker's tokenization), and who did speak."""

    token: int
    probs: dict[str, float]
    chosen: str | None = None
    forced: bool = False
    approximate: bool = False
    # Scored later (LaterFn): the voices in order and the future of their log-probabilities.
    _later: tuple[tuple[str, ...], Future[list[float]]] | None = field(
        default=None, repr=False, compare=False
    )

    def settle(self, wait: bool = True) -> bool:
        """Fill ``probs`` from a later scoring once it is done (waiting for it if ``wait``);
        returns whether ``probs`` is final. A failed scoring leaves no probabilities."""
        later = self._later
        if later is None:
            return True
        names, fut = later
        if not wait and not fut.done():
            return False
        self._later = None
        try:
            lps = fut.result()
        except Exception:
            return True
        self.probs = _probs(names, lps)
        return True

    def to_dict(self) -> dict[str, Any]:
        """The trace record."""
        d: dict[str, Any] = {
            "type": "voice_choice",
            "token": self.token,
            "probs": {k: round(v, 6) for k, v in self.probs.items()},
            "chosen": self.chosen,
            "forced": self.forced,
        }
        if self.approximate:
            d["approximate"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VoiceChoice:
        """Inverse of :meth:`to_dict`."""
        probs = d.get("probs") or {}
        return cls(
            token=int(d.get("token") or 0),
            probs={str(k): float(v) for k, v in probs.items() if isinstance(v, (int, float))},
            chosen=d.get("chosen") if isinstance(d.get("chosen"), str) else None,
            forced=bool(d.get("forced")),
            approximate=bool(d.get("approximate")),
        )


class Conductor:
    """Watches the reply as it is parsed and steers sampling at every token (one per run).

    Live controls (:meth:`set_next_voice`, :meth:`set_muted`) are thread-safe: the workbench
    calls them while a reply streams; they take effect at the next voice boundary.
    """

    def __init__(
        self,
        voices: VoiceSet,
        plan: SteerPlan | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 0,
        max_tokens: int = 256,
        seed: int | None = None,
        starts_in: str | None = None,
    ) -> None:
        self.voices = voices
        self.plan = (plan or SteerPlan()).resolved(voices)
        self.base = (temperature, top_p, top_k)
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.next_voice = self.plan.next_voice
        self.muted = set(self.plan.mute)
        self.structure = self.plan.structure
        self.vocab: Vocab | None = None
        self.choices: list[VoiceChoice] = []
        self._pending_choice: VoiceChoice | None = None
        self._queue: deque[int] = deque()
        self._queue_forced_voice: str | None = None
        self.voice = starts_in or voices.default_voice
        self.blocks: list[str] = []  # voices opened by a marker, in order
        self.block_tokens = 0
        self.block_text = False  # whether the open block has non-blank text yet
        self.tokens = 0  # reply tokens seen
        self.line = ""  # text of the current line so far
        self.tail = ""  # last characters of the reply (tag markers can start anywhere)
        self._started = False
        self._boundary_due = False

    # -- binding and live controls -----------------------------------------------------------

    def bind(self, vocab: Vocab) -> None:
        """Attach the backend's vocabulary (backends with token-level control call this)."""
        self.vocab = vocab

    def set_next_voice(self, name: str | None) -> None:
        """Make ``name`` open at the next boundary (None: let the model choose)."""
        with self._lock:
            self.next_voice = self._canon(name) if name else None

    def set_muted(self, name: str, muted: bool) -> None:
        """Mute or unmute a voice from the next token on."""
        with self._lock:
            v = self._canon(name)
            (self.muted.add if muted else self.muted.discard)(v)

    def _canon(self, name: str) -> str:
        v = self.voices.get(name)
        if v is None:
            raise SteerError(f"unknown voice {name!r}")
        return v.name

    # -- what Generation tells us ----------------------------------------------------------------

    def feed(self, text: str, events: Sequence[Event]) -> None:
        """A token was emitted (``text``) and the parser produced ``events`` for it."""
        self.tokens += 1
        self.block_tokens += 1
        nl = text.rfind("\n")
        self.line = text[nl + 1 :] if nl >= 0 else self.line + text
        if len(self.line) > 256:
            self.line = self.line[-256:]
        self.tail = (self.tail + text)[-64:]
        self.observe(events)

    def observe(self, events: Sequence[Event]) -> None:
        """Parser events (the voice that now speaks, blocks opened, text in a block)."""
        for e in events:
            if isinstance(e, VoiceStart):
                if e.marker:
                    self._opened(e.voice)
                self.voice = e.voice
            elif isinstance(e, VoiceEnd):
                self.voice = self.voices.default_voice
            elif e.text.strip():
                self.block_text = True

    def _opened(self, voice: str) -> None:
        self.blocks.append(voice)
        self.block_tokens = 0
        self.block_text = False
        if self._pending_choice is not None:
            self._pending_choice.chosen = voice
            self._pending_choice = None

    def finish(self) -> None:
        """The reply ended: close a boundary nobody answered; every record's probabilities
        are final."""
        self._pending_choice = None
        for c in self.choices:
            c.settle()

    def record_choice(
        self, probs: Mapping[str, float], forced: bool = False, approximate: bool = True
    ) -> VoiceChoice:
        """Record who-speaks-next at this boundary as a backend without parallel scoring
        estimated it (an HTTP server's top-k: approximate); the voice that opens next becomes
        its ``chosen``, as for scored boundaries."""
        with self._lock:
            choice = VoiceChoice(
                token=self.tokens, probs=dict(probs), forced=forced, approximate=approximate
            )
            self.choices.append(choice)
            self._pending_choice = choice
        return choice

    # -- per-token control -------------------------------------------------------------------

    def sampling_for(self, voice: str) -> tuple[float, float]:
        """Temperature and top-p in force while ``voice`` speaks."""
        t, p, _ = self.base
        v = self.voices.get(voice)
        if v is not None:
            t = v.temperature if v.temperature is not None else t
            p = v.top_p if v.top_p is not None else p
        over = self.plan.voice_sampling.get(voice)
        if over is not None:
            t = over[0] if over[0] is not None else t
            p = over[1] if over[1] is not None else p
        return t, p

    def _vector(self) -> tuple[tuple[str, float], ...]:
        """Voice vectors in force for the next token: the whole-reply ones, plus the speaking
        voice's own from its marker on (tokens already in the KV cache keep theirs)."""
        plan = self.plan
        if not plan.vectors and not plan.whole_vectors:
            return ()
        out = [(k, float(v)) for k, v in plan.whole_vectors.items() if v]
        s = plan.vectors.get(self.voice)
        if s and self.blocks and self.blocks[-1] == self.voice:
            out.append((self.voice, float(s)))
        return tuple(out)

    @property
    def at_line_start(self) -> bool:
        """Whether the next text begins a line (only spaces or tabs on it so far)."""
        return self.line.strip(" \t") == ""

    def step(self, score: ScoreFn | None = None, later: LaterFn | None = None) -> Step:
        """What to do for the next token (called by the backend before every token);
        ``later``: the backend can score a boundary off the reply's path (see :meth:`_score`)."""
        t, p = self.sampling_for(self.voice)
        st = Step(temperature=t, top_p=p, top_k=self.base[2], vector=self._vector())
        with self._lock:
            if not self._started:
                self._started = True
                self._reply_start(score, later)
            elif (
                self.structure is not None
                and not self._queue
                and not self._boundary_due
                and self.block_tokens >= self.structure.block_budget(self.max_tokens)
                and self.block_text
            ):
                # The block used its budget: end it here so the next voice comes in time.
                self._boundary_due = True
                gap = (
                    ""
                    if self.tail.endswith("\n\n")
                    else "\n"
                    if self.tail.endswith("\n")
                    else "\n\n"
                )
                self._enqueue(self.vocab.marker_ids(gap) if (self.vocab and gap) else [], None)
            if not self._queue and self._boundary_due and self.at_line_start:
                self._boundary_due = False
                self._choose(score, prefix="")
            if self._queue:
                st.force = self._queue.popleft()
                if not self._queue and self._queue_forced_voice:
                    self.voice = self._queue_forced_voice
                return st
            st.ban = self._bans()
            st.intercept = self._wants_intercept(score)
        return st

    def intercept(
        self, tok: int, score: ScoreFn | None = None, later: LaterFn | None = None
    ) -> tuple[int, bool]:
        """The backend sampled ``tok``; returns the token to emit and whether it is forced.

        A token that opens a bracket marker at a line start is a voice boundary: who speaks
        next is scored here (before ``tok`` is decoded, so the context is the one the model
        chose in), and a pending next voice or the structure replaces the marker.
        """
        vocab = self.vocab
        if vocab is None:
            return tok, False
        with self._lock:
            if self.structure is not None and tok in vocab.eog:
                return tok, False
            at = vocab.opens_marker(tok, self.at_line_start)
            if at is None:
                return tok, False
            prefix = vocab.texts[tok][:at]
            steer = self.next_voice is not None or self.structure is not None
            if not steer:
                self._score(score, prefix, forced=False, later=later)
                return tok, False
            self._choose(score, prefix)
            if not self._queue:
                return tok, False
            return self._queue.popleft(), True

    # -- internals -----------------------------------------------------------------------------

    def _wants_intercept(self, score: ScoreFn | None) -> bool:
        return self.vocab is not None and (
            self.next_voice is not None
            or self.structure is not None
            or (self.plan.score_voices and score is not None)
        )

    def _enqueue(self, ids: Sequence[int], voice: str | None) -> None:
        self._queue.extend(ids)
        self._queue_forced_voice = voice

    def _reply_start(self, score: ScoreFn | None, later: LaterFn | None = None) -> None:
        forced = self.next_voice is not None or self.structure is not None
        if forced:
            self._choose(score, prefix="")
        elif self.plan.score_voices and score is not None and self.vocab is not None:
            self._score(score, "", forced=False, later=later)

    def _allowed(self, first: bool) -> list[Voice]:
        st = self.structure
        vs = [v for v in self.voices.voices if v.name not in self.muted]
        if st is None:
            return vs
        vs = [v for v in vs if v.syntax == "bracket"]
        if first:
            vs = [
                v
                for v in vs
                if (st.first is None or v.name == st.first) and v.name not in st.never_first
            ]
        else:
            cur = self.blocks[-1] if self.blocks else None
            vs = [v for v in vs if v.name != cur]
            if st.max_per_voice:
                vs = [v for v in vs if self.blocks.count(v.name) < st.max_per_voice]
        return vs

    def _candidates(self, voices: Sequence[Voice], prefix: str) -> list[list[int]]:
        assert self.vocab is not None
        return [self.vocab.marker_ids(prefix + v.open_marker) for v in voices]

    def _score(
        self, score: ScoreFn | None, prefix: str, forced: bool, later: LaterFn | None = None
    ) -> dict[str, float]:
        """Record who-speaks-next at this boundary; returns the probabilities of every declared
        voice (muted ones too: what the model wanted is worth seeing). ``later``: a boundary
        that only observes (not ``forced``) is scored while the reply goes on; its record is
        filled when that is done (:meth:`VoiceChoice.settle`) and the returned dict is empty."""
        pend = self._pending_choice
        if pend is not None and pend.token == self.tokens and not prefix:
            pend.forced = pend.forced or forced  # the reply start, scored already
            if forced:
                pend.settle()  # a choice is made from it now
            return pend.probs
        if score is None or self.vocab is None or not self.plan.score_voices:
            return {}
        voices = list(self.voices.voices)
        if not voices:
            return {}
        seqs = self._candidates(voices, prefix)
        names = tuple(v.name for v in voices)
        fut = later(seqs) if later is not None and not forced else None
        if fut is not None:
            choice = VoiceChoice(token=self.tokens, probs={}, forced=False, _later=(names, fut))
        else:
            choice = VoiceChoice(token=self.tokens, probs=_probs(names, score(seqs)), forced=forced)
        self.choices.append(choice)
        self._pending_choice = choice
        return choice.probs

    def _choose(self, score: ScoreFn | None, prefix: str) -> None:
        """Pick the voice to open at this boundary and queue its marker (or end the reply)."""
        st = self.structure
        vocab = self.vocab
        if vocab is None:
            return
        first = not self.blocks
        if st is not None and not first:
            n_max = st.max_blocks or sum(
                1 for v in self.voices.voices if v.syntax == "bracket" and v.name not in self.muted
            )
            if len(self.blocks) >= n_max and self.block_text:
                self._enqueue(sorted(vocab.eog)[:1], None)
                return
        allowed = self._allowed(first)
        if st is not None and not allowed:
            if len(self.blocks) >= st.min_blocks:
                self._enqueue(sorted(vocab.eog)[:1], None)
                return
            allowed = [
                v
                for v in self.voices.voices
                if v.syntax == "bracket"
                and v.name not in self.muted
                and v.name != (self.blocks[-1] if self.blocks else None)
            ]
        probs = self._score(score, prefix, forced=True)
        voice: Voice | None = None
        nv = self.next_voice
        if nv is not None and any(v.name == nv for v in allowed):
            voice = self.voices.get(nv)
            self.next_voice = None
        elif st is None:
            # Only a next voice was asked for and it is not allowed here: let the model go on.
            if self._pending_choice is not None:
                self._pending_choice.forced = False
            return
        elif allowed:
            weights = [probs.get(v.name, 0.0) for v in allowed]
            if sum(weights) <= 0:
                weights = [1.0] * len(allowed)
            voice = self.rng.choices(allowed, weights=weights)[0]
        if voice is None:
            return
        self._enqueue(vocab.marker_ids(prefix + voice.open_marker + "\n"), voice.name)

    def _bans(self) -> np.ndarray | None:
        """Token ids masked at this step: muted voices' markers, and under structure the
        things that would break it (an end before the minimum, an empty block, close markers)."""
        vocab = self.vocab
        if vocab is None:
            return None
        parts: list[np.ndarray] = []
        if self.muted:
            parts.append(self._mute_bans(frozenset(self.muted)))
        st = self.structure
        if st is not None:
            parts.append(self._structure_bans())
            if len(self.blocks) < st.min_blocks or not self.block_text:
                parts.append(np.fromiter(vocab.eog, dtype=np.intc))
            if not self.block_text:
                # No new marker until this block has said something.
                parts.append(vocab.bracket_start if self.at_line_start else _empty())
                parts.append(np.fromiter(vocab.nl_bracket, dtype=np.intc))
        parts = [p for p in parts if p.size]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))

    def _marker_state(self) -> str | None:
        """The current line as a possible marker prefix ('' at a line start), else None."""
        s = self.line.lstrip(" \t")
        if s == "":
            return ""
        if s.startswith("[") and "]" not in s and len(s) <= MAX_MARKER_STATE:
            return s.lower()
        return None

    def _tag_state(self) -> str | None:
        i = self.tail.rfind("<")
        if i < 0:
            return None
        s = self.tail[i:].lower()
        return s if ">" not in s else None

    def _mute_bans(self, muted: frozenset[str]) -> np.ndarray:
        vocab = self.vocab
        assert vocab is not None
        bracket_m: list[str] = []
        bracket_ok: list[str] = []
        tag_m: list[str] = []
        for v in self.voices.voices:
            keys = _opener_keys(v)
            if v.syntax == "tag":
                if v.name in muted:
                    tag_m += keys
            elif v.name in muted:
                bracket_m += keys
            else:
                bracket_ok += keys
        parts = [vocab.cached(("nl", muted), lambda: self._scan_nl(bracket_m, bracket_ok))]
        state = self._marker_state()
        if state is not None and bracket_m:
            parts.append(
                vocab.cached(
                    ("line", muted, state),
                    lambda: self._scan(state, bracket_m, bracket_ok, anchor_line=True),
                )
            )
        if tag_m:
            parts.append(vocab.cached(("tag-any", muted), lambda: self._scan_tags(tag_m)))
            ts = self._tag_state()
            if ts is not None:
                parts.append(
                    vocab.cached(
                        ("tag", muted, ts), lambda: self._scan(ts, tag_m, [], anchor_line=False)
                    )
                )
        parts = [p for p in parts if p.size]
        return np.unique(np.concatenate(parts)) if parts else _empty()

    def _scan(
        self, state: str, muted: Sequence[str], allowed: Sequence[str], anchor_line: bool
    ) -> np.ndarray:
        """Ids whose text, appended to marker prefix ``state``, could only spell a muted marker."""
        assert self.vocab is not None
        out = []
        for i, t in enumerate(self.vocab.texts):
            if not t:
                continue
            piece = t.lstrip(" \t") if (anchor_line and state == "") else t
            s = (state + piece).lower()
            if anchor_line:
                s = s.split("\n", 1)[0]
            if not s or not s.startswith("[" if anchor_line else "<"):
                continue
            if _consistent(s, muted) and not _proper_prefix(s, allowed):
                out.append(i)
        return np.array(out, dtype=np.intc)

    def _scan_nl(self, muted: Sequence[str], allowed: Sequence[str]) -> np.ndarray:
        """Ids holding a line feed then the start of a muted bracket marker."""
        assert self.vocab is not None
        if not muted:
            return _empty()
        out = []
        for i, at in self.vocab.nl_bracket.items():
            s = self.vocab.texts[i][at:].split("\n", 1)[0].lower()
            if _consistent(s, muted) and not _proper_prefix(s, allowed):
                out.append(i)
        return np.array(sorted(out), dtype=np.intc)

    def _scan_tags(self, muted: Sequence[str]) -> np.ndarray:
        """Ids whose text holds a muted tag opener, or ends in a prefix of one after a '<'."""
        assert self.vocab is not None
        out = []
        for i, t in enumerate(self.vocab.texts):
            if "<" not in t:
                continue
            low = t.lower()
            j = low.rfind("<")
            if any(m in low for m in muted) or (j >= 0 and _consistent(low[j:], muted)):
                out.append(i)
        return np.array(out, dtype=np.intc)

    def _structure_bans(self) -> np.ndarray:
        """Close markers ('[/') can never appear under structure: they would leave text outside."""
        vocab = self.vocab
        assert vocab is not None

        def make() -> np.ndarray:
            return np.array([i for i, t in enumerate(vocab.texts) if "[/" in t], dtype=np.intc)

        base = vocab.cached("close", make)
        if self.tail.endswith("["):
            after = vocab.cached(
                "close-after",
                lambda: np.array(
                    [i for i, t in enumerate(vocab.texts) if t.startswith("/")], dtype=np.intc
                ),
            )
            return np.concatenate([base, after])
        return np.asarray(base)


def _probs(names: Sequence[str], lps: Sequence[float]) -> dict[str, float]:
    """Probabilities from log-probabilities, voice by voice (-inf and below: 0)."""
    return {n: (math.exp(lp) if lp > -1e30 else 0.0) for n, lp in zip(names, lps, strict=True)}


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.intc)
