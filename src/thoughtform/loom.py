"""Loom: branch a reply from any token or voice boundary, and compare branches voice by voice.

A branch is a parent reply, a fork point (token index ``at``) and what is forced there: an
alternative token (by id), any text, or "another voice opens here". The prefix before the fork
is reproduced (its telemetry copied, not regenerated) as the backend's
``Capabilities.branch_prefix`` says: ``"ids"`` = the parent's token ids exactly (llamacpp reuses
the prefix's KV cache and samples N children together in one batch per step,
:meth:`~thoughtform.backends.llamacpp.LlamaCppBackend.sample_children`; transformers feeds the ids
again), ``"text"`` = the parent's text re-sent to an HTTP server (openai), which re-tokenizes it,
so ids after the fork are not guaranteed to be those of an exact continuation. Backends without
batched children sample N children one after another (seeds ``seed + i``).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .backends.base import (
    Backend,
    BackendError,
    Capabilities,
    FinishEvent,
    GenerationRequest,
    Message,
    Sampling,
    StreamEvent,
    TokenEvent,
)
from .generate import Generation
from .metrics import voice_stats
from .parse import Segment
from .trace import TokenRecord, Trace
from .voices import VoiceSet, VoiceSetError, resolve_voice_set, voice_set_from_dict

MAX_CHILDREN = 16


class LoomError(ValueError):
    """A branch that cannot be made (fork out of range, no token ids, unknown voice)."""


@dataclass(frozen=True)
class Fork:
    """Where a branch leaves its parent and what it forces there (exactly one of the three)."""

    at: int
    token_id: int | None = None
    text: str | None = None
    voice: str | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.token_id, self.text, self.voice))
        if given != 1:
            raise LoomError("a fork forces exactly one of: a token id, a text, a voice")
        if self.at < 0:
            raise LoomError(f"fork index {self.at} is negative")

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (trace metadata, the session's branch table)."""
        return {"at": self.at, "token_id": self.token_id, "text": self.text, "voice": self.voice}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fork:
        """Inverse of :meth:`to_dict`."""
        tid = d.get("token_id")
        return cls(
            at=int(d.get("at") or 0),
            token_id=int(tid) if isinstance(tid, int) else None,
            text=d.get("text") if isinstance(d.get("text"), str) else None,
            voice=d.get("voice") if isinstance(d.get("voice"), str) else None,
        )

    def describe(self) -> str:
        """One line for listings: ``@12 token 4521``, ``@12 text '…'``, ``@12 voice Doubt``."""
        if self.token_id is not None:
            return f"@{self.at} token {self.token_id}"
        if self.voice is not None:
            return f"@{self.at} voice {self.voice}"
        return f"@{self.at} text {self.text!r}"


def trace_voice_set(trace: Trace, voices: VoiceSet | str | None = None) -> VoiceSet:
    """The voice set to branch with: given, else the one recorded in the trace, else seed."""
    if voices is not None:
        return resolve_voice_set(voices)
    data = trace.meta.get("voice_set")
    if isinstance(data, dict):
        try:
            return voice_set_from_dict(data, "<trace meta>")
        except VoiceSetError:
            pass
    return resolve_voice_set(trace.meta.get("voices") or "seed")


def branch_model(parent: Trace, override: str | None = None) -> str | None:
    """The llama.cpp model spec to branch ``parent`` with: ``override``, else the one its trace
    names (``embedded``, ``embedded-voices`` or a .gguf; an adapter suffix such as
    ``embedded+voices-seed`` means the voices model). None is the plain embedded model."""
    model = str(override or parent.meta.get("model") or "embedded-voices")
    if not override and model.endswith(".gguf") and not Path(model).expanduser().is_file():
        # A recorded file name, not a path (transformers names the embedded GGUF by its file).
        from .models import embedded_gguf_path

        try:
            model = "embedded" if Path(model).name == embedded_gguf_path().name else model
        except BackendError:  # the embedded model is not installed: keep the recorded name
            pass
    if model not in ("embedded", "embedded-voices") and not model.endswith(".gguf"):
        model = "embedded-voices" if "voices" in model else "embedded"
    return None if model == "embedded" else model


def parent_request(parent: Trace) -> GenerationRequest:
    """The request that produced ``parent`` (messages or prompt, sampling, alternatives)."""
    m = parent.meta
    msgs = tuple(
        Message(str(x.get("role")), str(x.get("content")))
        for x in m.get("messages") or []
        if isinstance(x, dict)
    )
    raw = m.get("sampling") if isinstance(m.get("sampling"), dict) else {}
    fields = Sampling.__dataclass_fields__
    kw: dict[str, Any] = {
        k: (tuple(v) if k == "stop" else v)
        for k, v in (raw or {}).items()
        if k in fields and v is not None
    }
    sampling = Sampling(**kw)
    prompt = m.get("prompt") if isinstance(m.get("prompt"), str) else None
    if not msgs and prompt is None:
        raise LoomError("the parent trace does not record its request (messages or prompt)")
    return GenerationRequest(
        messages=msgs,
        prompt=prompt if not msgs else None,
        sampling=sampling,
        alternatives=int(m.get("alternatives") or 5),
    )


def _prefix_ids(parent: Trace, at: int) -> list[int]:
    if at > len(parent.tokens):
        raise LoomError(f"fork index {at} is past the reply's {len(parent.tokens)} tokens")
    ids = [t.token_id for t in parent.tokens[:at]]
    if any(i is None for i in ids):
        raise LoomError(
            "the parent has tokens without ids before the fork (recorded by a backend that"
            " gives none): it cannot be reproduced exactly"
        )
    return [int(i) for i in ids if i is not None]


def forced_text(parent: Trace, fork: Fork, voices: VoiceSet) -> str:
    """The text a fork forces: its text, the voice's marker on a line of its own after a blank
    line ("another voice opens here"), or a token id's piece as the parent recorded it (the
    chosen token or one of the alternatives at the fork)."""
    if fork.text is not None:
        if not fork.text:
            raise LoomError("forced text is empty")
        return fork.text
    if fork.voice is not None:
        v = voices.get(fork.voice)
        if v is None:
            raise LoomError(f"unknown voice {fork.voice!r} (declared: {', '.join(voices.names())})")
        before = "".join(t.text for t in parent.tokens[: fork.at])
        gap = (
            ""
            if (not before or before.endswith("\n\n"))
            else "\n"
            if before.endswith("\n")
            else "\n\n"
        )
        return gap + v.open_marker + "\n"
    t = parent.tokens[fork.at] if fork.at < len(parent.tokens) else None
    cands = (
        []
        if t is None
        else [(t.token_id, t.bytes, t.text), *((a.token_id, a.bytes, a.text) for a in t.top)]
    )
    for tid, raw, text in cands:
        if tid == fork.token_id:
            if raw is not None:
                return raw.decode("utf-8", errors="replace")
            return text
    raise LoomError(
        f"token id {fork.token_id} is not recorded at token {fork.at} (neither chosen nor an"
        " alternative), so its text is unknown: force it as text"
    )


def forced_ids(backend: Any, parent: Trace, fork: Fork, voices: VoiceSet) -> list[int]:
    """The token ids a fork forces (a marker for "another voice opens here")."""
    if fork.token_id is not None:
        return [fork.token_id]
    tokenize = getattr(backend, "tokenize", None)
    if tokenize is None:
        raise LoomError(f"backend {getattr(backend, 'name', '?')!r} cannot tokenize forced text")
    ids = tokenize(forced_text(parent, fork, voices))
    if not ids:
        raise LoomError(f"backend {getattr(backend, 'name', '?')!r} cannot tokenize forced text")
    return list(ids)


class _Prefixed:
    """A backend view that first replays the parent's prefix (its recorded telemetry), then
    streams the real backend's continuation of it."""

    name = "loom"

    def __init__(
        self,
        backend: Backend,
        prefix: Sequence[TokenRecord],
        fork_telemetry: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.prefix = list(prefix)
        self.model_name = getattr(backend, "model_name", None)
        # A text branch's forced token comes from the server without telemetry; the parent
        # recorded the model's distribution at the fork (same context), so it is filled in.
        self.fork_telemetry = fork_telemetry

    @property
    def capabilities(self) -> Capabilities:
        """The real backend's."""
        return self.backend.capabilities

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """The prefix as recorded, then the continuation."""
        for t in self.prefix:
            yield _event(t)
        first = True
        for ev in self.backend.stream(request, cancel):
            if first and self.fork_telemetry and isinstance(ev, TokenEvent):
                if ev.forced and ev.logprob is None and not ev.top:
                    ev = replace(ev, **self.fork_telemetry)
            first = False
            yield ev

    def close(self) -> None:
        """The real backend stays open (it belongs to the caller)."""


class _Events:
    """Plays a fixed list of token events (children sampled together) then a finish."""

    name = "loom"

    def __init__(self, events: Sequence[TokenEvent], finish: FinishEvent, model: Any) -> None:
        self.events = list(events)
        self.finish = finish
        self.model_name = model

    @property
    def capabilities(self) -> Capabilities:
        """Nothing of its own."""
        return Capabilities()

    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """The events, then the finish."""
        yield from self.events
        yield self.finish

    def close(self) -> None:
        """Nothing to release."""


def _event(t: TokenRecord) -> TokenEvent:
    return TokenEvent.of_record(t)


def branch(
    backend: Backend,
    parent: Trace,
    fork: Fork,
    n: int = 1,
    seed: int | None = None,
    max_tokens: int | None = None,
    voices: VoiceSet | str | None = None,
    parent_id: str | None = None,
) -> list[Trace]:
    """``n`` branches of ``parent`` from ``fork`` (child ``i`` sampled with ``seed + i``).

    Each child trace holds the parent's prefix tokens (same ids, same telemetry), the forced
    tokens (marked forced; one token of text on a ``"text"`` backend) and its own continuation,
    parsed into voices like any reply; its metadata says where it came from (``branch``: parent,
    fork, seed, ``prefix`` "ids" or "text", ``exact_ids``). Children are sampled in one batch
    where the backend has ``sample_children``, else one after another."""
    if not 1 <= n <= MAX_CHILDREN:
        raise LoomError(f"between 1 and {MAX_CHILDREN} children, not {n}")
    vs = trace_voice_set(parent, voices)
    req = parent_request(parent)
    check_branch_backend(backend, LoomError)
    how = getattr(backend.capabilities, "branch_prefix", "ids")
    if fork.at > len(parent.tokens):
        raise LoomError(f"fork index {fork.at} is past the reply's {len(parent.tokens)} tokens")
    records = parent.tokens[: fork.at]
    prefix: list[int] = []
    forced: list[int] = []
    fork_telemetry: dict[str, Any] | None = None
    if how == "text":
        text = forced_text(parent, fork, vs)
        n_forced = 1  # the forced text is one forced token event
        prefix_text = "".join(t.text for t in records)
        req = replace(req, prefix_text=prefix_text, forced_text=text)
        if fork.at < len(parent.tokens):
            pt = parent.tokens[fork.at]
            fork_telemetry = {
                "top": tuple(pt.top),
                "entropy": pt.entropy,
                "logprob": parent_logprob(parent, fork),
                "token_id": fork.token_id,
            }
    else:
        prefix = _prefix_ids(parent, fork.at)
        forced = forced_ids(backend, parent, fork, vs)
        n_forced = len(forced)
        req = replace(req, prefix=tuple(prefix), forced=tuple(forced))
    base_seed = seed if seed is not None else int(req.sampling.seed or 0) + 1
    sampling = req.sampling
    if max_tokens is not None:
        sampling = replace(sampling, max_tokens=max_tokens)
    req = replace(req, sampling=sampling)
    meta_base = {
        "kind": "generation",
        "voices": vs.name,
        "voice_set": vs.to_dict(),
        "starts_in": parent.meta.get("starts_in"),
    }
    starts_in = (
        parent.meta.get("starts_in") if isinstance(parent.meta.get("starts_in"), str) else None
    )
    seeds = [base_seed + i for i in range(n)]
    sample = getattr(backend, "sample_children", None) if how == "ids" else None
    if n == 1 or sample is None:
        # One child at a time, each a plain generation continuing the shared prefix.
        out: list[Trace] = []
        for sd in seeds:
            child_req = replace(req, sampling=replace(sampling, seed=sd))
            meta = {**meta_base, "branch": _branch_meta(parent, fork, sd, parent_id, how)}
            gen = Generation(
                _Prefixed(backend, records, fork_telemetry),
                child_req,
                vs,
                starts_in=starts_in,
                meta=meta,
            )
            kid = gen.run()
            end = kid.finish or {}
            if end.get("reason") == "error" and len(kid.tokens) <= fork.at:
                # Nothing past the fork: the backend refused (e.g. no way to continue a chat).
                raise LoomError(f"the branch failed: {end.get('message') or 'backend error'}")
            out.append(kid)
        return out
    import time

    t0 = time.perf_counter()
    children = sample(req, n, seeds)
    dt = time.perf_counter() - t0
    prefix_events = [_event(t) for t in records]
    out = []
    for i, evs in enumerate(children):
        fin = FinishEvent(
            "length" if len(evs) - n_forced >= (sampling.max_tokens or 0) else "stop",
            timings={"batch_s": dt},
            usage={"prefix_tokens": len(prefix), "completion_tokens": len(evs)},
        )
        meta = {**meta_base, "branch": _branch_meta(parent, fork, seeds[i], parent_id, how)}
        child_req = replace(req, sampling=replace(sampling, seed=seeds[i]))
        gen = Generation(
            _Events(prefix_events + list(evs), fin, getattr(backend, "model_name", None)),
            child_req,
            vs,
            starts_in=starts_in,
            meta=meta,
            conduct=False,
        )
        out.append(gen.run())
    return out


def _branch_meta(
    parent: Trace, fork: Fork, seed: int, parent_id: str | None, how: str = "ids"
) -> dict[str, Any]:
    p = parent.tokens[fork.at] if fork.at < len(parent.tokens) else None
    return {
        "parent": parent_id or parent.meta.get("id") or parent.meta.get("created"),
        "fork": fork.to_dict(),
        "seed": seed,
        # How the prefix reached the model: "ids" exactly, or "text" re-sent to a server that
        # re-tokenizes it (the telemetry before the fork is the parent's either way, but the
        # model may have seen other ids than the parent's).
        "prefix": how,
        "exact_ids": how == "ids",
        "parent_token": None if p is None else {"token_id": p.token_id, "text": p.text},
        "parent_logprob": parent_logprob(parent, fork),
    }


def parent_logprob(parent: Trace, fork: Fork) -> float | None:
    """The parent's log-probability of the token a fork forces first, when it is known (the
    chosen token, or one of the recorded alternatives at the fork)."""
    if fork.at >= len(parent.tokens) or fork.token_id is None:
        return None
    t = parent.tokens[fork.at]
    if t.token_id == fork.token_id:
        return t.logprob
    for a in t.top:
        if a.token_id == fork.token_id:
            return a.logprob
    return None


# -------------------------------------------------------------------------------- compare

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def fork_index(a: Trace, b: Trace) -> int:
    """The first token index where two traces differ (by id, else text)."""
    n = min(len(a.tokens), len(b.tokens))
    for i in range(n):
        ta, tb = a.tokens[i], b.tokens[i]
        same = (
            ta.token_id == tb.token_id
            if ta.token_id is not None and tb.token_id is not None
            else ta.text == tb.text
        )
        if not same:
            return i
    return n


def _char_at(trace: Trace, index: int) -> int:
    return sum(len(t.text) for t in trace.tokens[:index])


def _segments_from(trace: Trace, char: int) -> list[Segment]:
    return [s for s in trace.segments if s.end > char and s.text.strip()]


def _voice_seq(trace: Trace, char: int) -> list[str]:
    seq: list[str] = []
    for s in _segments_from(trace, char):
        if not seq or seq[-1] != s.voice:
            seq.append(s.voice)
    return seq


def reconvergence(a: Trace, b: Trace, at: int, n_words: int = 4) -> dict[str, Any] | None:
    """Where two branches first say the same ``n_words`` words in a row again after the fork:
    the word offsets in each and the words, or None if they never do."""
    wa = _WORD.findall("".join(t.text for t in a.tokens[at:]).lower())
    wb = _WORD.findall("".join(t.text for t in b.tokens[at:]).lower())
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(wb) - n_words + 1):
        grams.setdefault(tuple(wb[i : i + n_words]), i)
    for i in range(len(wa) - n_words + 1):
        j = grams.get(tuple(wa[i : i + n_words]))
        if j is not None:
            return {"a_word": i, "b_word": j, "words": " ".join(wa[i : i + n_words])}
    return None


def compare(a: Trace, b: Trace, at: int | None = None) -> dict[str, Any]:
    """Two branches side by side from their fork: voice sequences (appeared, vanished,
    reordered), per-voice tokens / mean surprisal (bits) / mean entropy after the fork, the
    probability the other gave each one's first forked token, and where they re-converge."""
    at = fork_index(a, b) if at is None else at
    ca, cb = _char_at(a, at), _char_at(b, at)
    sa, sb = _voice_seq(a, ca), _voice_seq(b, cb)

    def stats(t: Trace) -> dict[str, dict[str, float | int | None]]:
        out: dict[str, dict[str, float | int | None]] = {}
        for vs_ in voice_stats(t.tokens[at:]):
            surprisal = None if vs_.mean_logprob is None else -vs_.mean_logprob / math.log(2)
            out[vs_.voice] = {
                "tokens": vs_.tokens,
                "mean_surprisal": None if surprisal is None else round(surprisal, 4),
                "mean_entropy": None if vs_.mean_entropy is None else round(vs_.mean_entropy, 4),
            }
        return out

    def prob_of(other: Trace, mine: Trace) -> float | None:
        if at >= len(other.tokens) or at >= len(mine.tokens):
            return None
        tid = mine.tokens[at].token_id
        t = other.tokens[at]
        if tid is None:
            return None
        if t.token_id == tid and t.logprob is not None:
            return math.exp(t.logprob)
        for alt in t.top:
            if alt.token_id == tid and alt.logprob is not None:
                return math.exp(alt.logprob)
        return None

    set_a, set_b = set(sa), set(sb)
    common = [v for v in sa if v in set_b]
    common_b = [v for v in sb if v in set_a]
    return {
        "fork": at,
        "a": {"voices": sa, "stats": stats(a), "forked_token_p_under_b": prob_of(b, a)},
        "b": {"voices": sb, "stats": stats(b), "forked_token_p_under_a": prob_of(a, b)},
        "appeared": [v for v in sb if v not in set_a],
        "vanished": [v for v in sa if v not in set_b],
        "reordered": common != common_b,
        "reconverge": reconvergence(a, b, at),
    }


def check_branch_backend(backend: Backend, error: type[Exception] = BackendError) -> None:
    """Raise ``error`` (BackendError by default) when the backend cannot branch (used by the
    CLI, the UI and :func:`branch`)."""
    if not getattr(backend.capabilities, "branching", False):
        raise error(
            f"backend {getattr(backend, 'name', '?')!r} cannot continue a reply from a fork;"
            " branching needs the llamacpp or transformers backend (token ids) or openai (text)"
        )
