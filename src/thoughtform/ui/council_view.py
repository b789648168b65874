"""The workbench's Council tab: voices take turns as separate speakers (thoughtform.council),
streamed turn by turn into their own blocks, one lane per member, the resonance arcs between
the lanes and the voice x voice matrix, in the measure the user picks (echo on every backend,
attention on transformers, counterfactual on llamacpp / transformers: ``resonance.council_scores``).

:class:`CouncilService` does the work (testable without a browser); :func:`council_tab` lays out
the tab and wires it. The page gets whole snapshots of the council (a few KB: the turns, who chose
each speaker and with what probabilities, the chosen measure's matrix and arcs) as JSON in one
``gr.HTML`` value; ``assets/council.js`` draws them with ``textContent`` only. Members are picked
and ordered in a list drawn by the same script (drag, or the up / down buttons, or Alt+arrows),
which writes the order into a hidden box the Start button reads. Councils are saved in the sessions
database (``council_store.py``) after every turn, and export as trace JSONL, Markdown or an HTML
report.

Members speak through the workbench's backend unless their voice (in the session's voice set, the
one the Voices tab edits) names its own (``backend`` / ``model`` / ``base_url``): the library's
:func:`thoughtform.council.member_backends` opens those through the workbench's backend cache
(:meth:`CouncilService.open_backend`), and the member list says which each member speaks through.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ..backends.base import Backend, Sampling
from ..conversation import ChatSettings, voice_settings
from ..council import DEFAULT_TURN_TOKENS, POLICIES, USER, Council, CouncilError, Turn, transcript
from ..resonance import (
    ARC_THRESHOLDS,
    MEASURES,
    UNITS,
    MeasureUnavailable,
    arcs,
    council_scores,
    echo_scores,
    voice_matrix,
)
from ..voices import VoiceSet
from .common import asset, plain
from .council_store import CouncilStore, new_council_id, valid_council_id
from .service import Workbench, WorkbenchError

__all__ = [
    "DEFAULT_MEMBERS",
    "EXPORTS",
    "CouncilService",
    "LiveCouncil",
    "council_markdown",
    "council_tab",
]

DEFAULT_MEMBERS = ("Echo", "Doubt", "Pulse", "Shift")
EXPORTS = ["Trace (JSONL)", "HTML report", "Markdown"]
MAX_TURNS = 64
MAX_TEXT = 4000
SNAPSHOT_EVERY_S = 0.1  # at most ~10 snapshots a second while a turn streams
WAIT_BEAT_S = 2.0


@dataclass
class LiveCouncil:
    """A council the workbench holds: its owner, title, and what its runs share."""

    id: str
    owner: str | None
    title: str
    council: Council
    pause: threading.Event = field(default_factory=threading.Event)
    running: threading.Lock = field(default_factory=threading.Lock)
    state: str = "idle"  # idle | waiting | running | pausing | paused | stopped | done
    note: str = ""
    measure: str = "echo"  # the resonance measure the matrix and the arcs show
    # counterfactual surprisals, (turn, removed turns) -> nats/token: computed once each
    cf_cache: dict[tuple[int, frozenset[int]], float] = field(default_factory=dict)


def council_markdown(title: str, turns: Sequence[Turn]) -> str:
    """A council as Markdown: each turn under its speaker (who chose it, and how likely)."""
    out = [f"# {title}", ""]
    for t in turns:
        who = "You" if t.voice is None else t.voice
        how = {"model": "chosen by the model", "forced": "forced", "rule": t.policy}.get(t.by, "")
        if t.voice is not None and t.source == "user":
            how = "written by you"
        head = f"**{who}**" + (f" _({how})_" if how else "")
        if t.probs:
            ranked = sorted(t.probs.items(), key=lambda kv: -kv[1])
            head += " — " + ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        if t.interrupted:
            head += " _(interrupted)_"
        out += [head, "", t.text.replace("\n", "  \n"), ""]
    return "\n".join(out)


class CouncilService:
    """Councils in the workbench: start, pause, resume, stop, force, mute, the user's words,
    saving and export; every method takes the user and only touches that user's councils."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb
        self.store = CouncilStore(wb.store)
        self.live: dict[str, LiveCouncil] = {}
        self._lock = threading.Lock()
        self._nonce = itertools.count(1)

    # -- voices and lookup ---------------------------------------------------------------

    @property
    def voices(self) -> VoiceSet:
        """The server's voice set (``serve --voices``): members are chosen from it."""
        return self.wb.default_voices

    def voices_for(self, user: str | None, sid: str | None = None) -> VoiceSet:
        """The voice set a new council takes its members from: the session's (Voices tab), or
        the server's when no session is open."""
        return self.wb.voices_of(self.wb.session_info(sid, user)) if sid else self.voices

    def member_choices(self, vs: VoiceSet | None = None) -> list[str]:
        """The voices a council may have as members (bracket voices, in lane order)."""
        vs = vs or self.voices
        return [n for n in vs.names() if vs.voice(n).syntax == "bracket"]

    def shared_settings(self) -> ChatSettings:
        """The backend binding members without one of their own share (serve's settings)."""
        s = self.wb.default_settings()
        return ChatSettings(
            backend=s["backend"], model=s.get("model") or None, base_url=s.get("base_url") or None
        )

    def open_backend(self, cs: ChatSettings) -> Backend:
        """A member's own backend, through the workbench's cache (created once, closed with the
        workbench; a replay member's recording is picked inside ``serve --replay DIR``)."""
        if cs.adapter:
            raise WorkbenchError("adapter: the workbench has no LoRA adapter setting yet")
        s = self.wb.default_settings()
        s.update(backend=cs.backend, model=cs.model or "", base_url=cs.base_url or "")
        return self.wb.backend_for(s)

    def get(self, cid: str | None, user: str | None) -> LiveCouncil:
        """A council of this user, held or loaded from the database."""
        owner = self.wb.owner(user)
        if not valid_council_id(cid):
            raise WorkbenchError("no council open: start one first")
        assert isinstance(cid, str)
        with self._lock:
            live = self.live.get(cid)
            if live is not None:
                if live.owner != owner:
                    raise WorkbenchError("no such council")
                return live
        trace = self.store.load(cid, owner)
        if trace is None:
            raise WorkbenchError("no such council")
        backend = self.wb.backend_for(self.wb.default_settings())
        try:
            council = Council.from_trace(
                trace,
                backend,
                chooser=_no_pick,
                attention=_has_attention(backend),
                settings=self.shared_settings(),
                open_backend=self.open_backend,
            )
        except (CouncilError, WorkbenchError) as e:
            raise WorkbenchError(str(e)) from None
        live = LiveCouncil(cid, owner, str(trace.meta.get("title") or "Council"), council)
        live.state = "stopped" if council.turns and council.turns[-1].interrupted else "idle"
        with self._lock:
            return self.live.setdefault(cid, live)

    def choices(self, user: str | None) -> list[tuple[str, str]]:
        """(label, id) of the user's saved councils, newest first."""
        return [(c.title, c.id) for c in self.store.list(self.wb.owner(user))]

    # -- snapshots -------------------------------------------------------------------------

    def resonance(
        self, live: LiveCouncil, settled: bool | None = None
    ) -> tuple[str, dict[int, dict[int, float]], str]:
        """(the measure shown, its scores, a one-line note) for the council's chosen measure.

        A measure the backend cannot give falls back to echo, and the note says why. The
        counterfactual one is computed only when ``settled`` (default: no run in progress): while
        a turn streams the backend is busy generating (its lock is held by the very generation
        this snapshot interrupts), so until then only cached surprisals are shown."""
        c = live.council
        if settled is None:
            settled = not live.running.locked()
        measure = live.measure
        note = ""
        try:
            scores = council_scores(c, measure, live.cf_cache, compute=settled)
        except MeasureUnavailable as e:
            return "echo", echo_scores(c.turns), f"{e}; showing echo"
        except Exception as e:  # a backend failing to score (context too long...): one line
            line = " ".join(str(e).split())[:200]
            return "echo", echo_scores(c.turns), f"{measure}: failed ({line}); showing echo"
        if measure == "counterfactual" and not settled:
            scored = sum(1 for t in c.turns if t.voice is not None and t.source == "model")
            if len(scores) < scored:
                note = "counterfactual: new turns are scored when the council pauses or ends"
        return measure, scores, note

    def snapshot(
        self, live: LiveCouncil | None, error: str = "", settled: bool | None = None
    ) -> str:
        """What the page draws: the whole council as JSON (see ``assets/council.js``)."""
        d: dict[str, Any] = {"n": next(self._nonce), "kind": "council", "error": error[:500]}
        if live is None:
            d.update(
                id=None, state="idle", members=[], voices={}, turns=[], matrix=None, arcs=[],
                measure="echo", shown="echo", unit=UNITS["echo"], measure_note="",
            )  # fmt: skip
            return json.dumps(d, ensure_ascii=False, allow_nan=False)
        c = live.council
        vs = c.voices
        turns = list(c.turns)
        labels = list(c.members)
        if any(t.voice is None for t in turns):
            labels.insert(0, USER)
        labels += [t.voice for t in turns if t.voice is not None and t.voice not in labels]
        shown, scores, measure_note = self.resonance(live, settled)
        matrix = voice_matrix(turns, scores, labels=labels)
        d.update(
            id=live.id,
            title=live.title,
            state=live.state,
            note=live.note,
            policy=c.policy,
            members=[
                {
                    "name": m,
                    "color": vs.color_of(m),
                    "glyph": vs.voice(m).glyph,
                    "muted": m in c.muted,
                    "backend": _backend_label(c.backend_for(m)),
                }
                for m in c.members
            ],
            voices={v.name: vs.color_of(v.name) for v in vs.voices},
            turns=[
                {
                    "i": t.index,
                    "voice": t.voice,
                    "text": t.text,
                    "by": t.by,
                    "policy": t.policy,
                    "source": t.source,
                    "probs": {k: round(v, 4) for k, v in t.probs.items()},
                    "finish": t.finish,
                }
                for t in turns
            ],
            matrix=matrix.to_dict(),
            arcs=[a.to_dict() for a in arcs(scores, ARC_THRESHOLDS[shown])],
            measure=live.measure,
            shown=shown,
            unit=UNITS[shown],
            measure_note=measure_note,
        )
        return json.dumps(d, ensure_ascii=False, allow_nan=False)

    def set_measure(self, cid: str | None, measure: str, user: str | None) -> str:
        """Show ``measure`` (echo, attention, counterfactual) in the matrix and the arcs."""
        if measure not in MEASURES:
            raise WorkbenchError(f"unknown measure {measure!r} (choose {', '.join(MEASURES)})")
        live = self.get(cid, user)
        live.measure = measure
        return self.snapshot(live)

    def order_value(
        self,
        user: str | None = None,
        sid: str | None = None,
        live: LiveCouncil | None = None,
        ticked: Sequence[str] | None = None,
    ) -> str:
        """What the member list draws, as JSON: every voice that may be a member, its colour and
        the backend it speaks through (its own binding, or the shared one). For a council
        (``live``): its members first, in its order, ticked, and its voice set; else the
        session's voice set with ``ticked`` (those still in it; default: the default members)
        first and ticked."""
        if live is not None:
            c = live.council
            vs, on = c.voices, list(c.members)
        else:
            vs = self.voices_for(user, sid)
            names = self.member_choices(vs)
            on = [m for m in ticked or () if m in names]
            if not on:
                on = [m for m in DEFAULT_MEMBERS if m in names] or names[:4]
        names = self.member_choices(vs)
        shared = self.shared_settings()
        s = self.wb.default_settings()
        rows = []
        for n in [*on, *(n for n in names if n not in on)]:
            if live is not None and n in on:
                where = _backend_label(live.council.backend_for(n))
            else:
                vc = voice_settings(shared, vs.voice(n))
                bound = {"backend": vc.backend, "model": vc.model or ""}
                where = _settings_label(bound if vc is not shared else s, self.wb.config.replay)
            rows.append({"name": n, "color": vs.color_of(n), "on": n in on, "backend": where})
        return json.dumps({"kind": "order", "voices": rows}, ensure_ascii=False)

    def members_value(self, order: str) -> str:
        """The hidden members box's value for a member list (the ticked names, in order)."""
        rows = json.loads(order)["voices"]
        return json.dumps([r["name"] for r in rows if r["on"]], ensure_ascii=False)

    def parse_members(self, raw: object) -> list[str]:
        """The members the page sent (a JSON list of names, in order, or "A,B,C")."""
        if isinstance(raw, list):
            got: object = raw
        else:
            text = str(raw or "").strip()
            try:
                got = json.loads(text) if text.startswith("[") else text.split(",")
            except ValueError:
                raise WorkbenchError("members: not a list of voice names") from None
        if not isinstance(got, list) or not all(isinstance(m, str) for m in got):
            raise WorkbenchError("members: not a list of voice names")
        out = [m.strip() for m in got if m.strip()]
        if not out:
            raise WorkbenchError("pick at least one member first")
        return out

    def save(self, live: LiveCouncil) -> None:
        """Write the council to the database (its whole trace)."""
        c = live.council
        c.trace.meta["title"] = live.title
        self.store.save(live.id, live.owner, live.title, c.trace)

    # -- running -----------------------------------------------------------------------------

    def start(
        self,
        members: Sequence[str],
        policy: str,
        turns: int,
        max_tokens: int,
        prompt: str,
        user: str | None,
        measure: str = "echo",
        sid: str | None = None,
    ) -> Iterator[tuple[str, str]]:
        """A new council of voices from session ``sid``'s voice set (each on its own binding,
        if it has one): the prompt is the user's first message; then ``turns`` turns, its
        resonance shown in ``measure``. Yields (snapshot, council id)."""
        owner = self.wb.owner(user)
        if not isinstance(prompt, str) or not prompt.strip():
            raise WorkbenchError("write what you say to the council first")
        if len(prompt) > MAX_TEXT:
            raise WorkbenchError(f"message too long ({len(prompt)} > {MAX_TEXT} characters)")
        s = self.wb.default_settings()
        backend = self.wb.backend_for(s)
        if s["backend"] == "replay":
            max_tokens = 0  # a recording plays whole (as in the chat)
        if measure not in MEASURES:
            raise WorkbenchError(f"unknown measure {measure!r} (choose {', '.join(MEASURES)})")
        try:
            council = Council(
                self.voices_for(user, sid),
                list(members),
                backend,
                policy,
                sampling=Sampling(
                    temperature=float(s.get("temperature") or 0.7),
                    top_p=float(s.get("top_p") or 0.95),
                    seed=s.get("seed"),
                    max_tokens=max(0, int(max_tokens)),
                ),
                seed=s.get("seed"),
                chooser=_no_pick,
                alternatives=0,
                # Attention resonance where the backend can record it (transformers).
                attention=_has_attention(backend),
                settings=self.shared_settings(),
                open_backend=self.open_backend,
            )
        except CouncilError as e:
            raise WorkbenchError(str(e)) from None
        cid = new_council_id()
        live = LiveCouncil(cid, owner, _title(prompt), council, measure=measure)
        council.say(prompt)
        with self._lock:
            self.live[cid] = live
        self.save(live)
        yield from self._drive(live, turns, user)

    def resume(self, cid: str | None, turns: int, user: str | None) -> Iterator[tuple[str, str]]:
        """Go on for ``turns`` more turns."""
        live = self.get(cid, user)
        yield from self._drive(live, turns, user)

    def speak_next(self, cid: str | None, name: str, user: str | None) -> Iterator[tuple[str, str]]:
        """Make ``name`` speak next: at the next turn of a running council, or now (one turn)."""
        live = self.get(cid, user)
        try:
            live.council.force_next(name)
        except CouncilError as e:
            raise WorkbenchError(str(e)) from None
        if live.running.locked():
            live.note = f"{name} speaks next"
            yield self.snapshot(live), live.id
            return
        yield from self._drive(live, 1, user)

    def _drive(self, live: LiveCouncil, turns: int, user: str | None) -> Iterator[tuple[str, str]]:
        turns = max(0, min(int(turns), MAX_TURNS))
        if not live.running.acquire(blocking=False):
            raise WorkbenchError("this council is already running")
        ticket: int | None = None
        try:
            live.pause.clear()
            live.note = ""
            ticket = self.wb.queue.join(live.owner or "")
            ahead = self.wb.queue.wait(ticket, None, 0)
            beat = -WAIT_BEAT_S
            while ahead is not None:
                live.state, live.note = "waiting", f"waiting: {ahead} ahead"
                if time.monotonic() - beat >= WAIT_BEAT_S:
                    yield self.snapshot(live), live.id
                    beat = time.monotonic()
                if live.pause.is_set():
                    live.state, live.note = "paused", ""
                    yield self.snapshot(live), live.id
                    return
                ahead = self.wb.queue.wait(ticket, ahead, 0.5)
            live.state, live.note = "running", ""
            yield self.snapshot(live, settled=False), live.id
            last = 0.0
            error = ""
            try:
                for ev in live.council.run(turns, pause=live.pause):
                    if ev.kind == "text" and time.monotonic() - last < SNAPSHOT_EVERY_S:
                        continue
                    if ev.kind == "end":
                        self.save(live)
                        if ev.turn.finish == "error":
                            error = ev.turn.message
                    last = time.monotonic()
                    yield self.snapshot(live, error, settled=False), live.id
            except CouncilError as e:
                error = str(e)
            c = live.council
            last_turn = c.turns[-1] if c.turns else None
            if last_turn is not None and last_turn.finish == "cancelled":
                live.state = "stopped"
            elif live.pause.is_set():
                live.state = "paused"
            elif c.policy == "manual" and not error:
                live.state, live.note = "idle", "pick who speaks next"
            else:
                live.state = "done"
            self.save(live)
            # The run is over (this run's queue ticket still held): a fine time to score.
            yield self.snapshot(live, error, settled=True), live.id
        finally:
            if live.state == "pausing":
                live.state = "paused"
            elif live.state in ("running", "waiting"):
                live.state = "stopped"  # the page went away mid-run
                try:
                    self.save(live)
                except Exception:
                    pass
            if ticket is not None:
                self.wb.queue.leave(ticket)
            live.running.release()

    # -- live controls ------------------------------------------------------------------------

    def pause(self, cid: str | None, user: str | None) -> str:
        """Pause after the turn in progress."""
        live = self.get(cid, user)
        live.pause.set()
        if live.running.locked() and live.state in ("running", "waiting"):
            live.state = "pausing"
        return self.snapshot(live)

    def stop(self, cid: str | None, user: str | None) -> str:
        """Stop now: the turn in progress is kept, marked interrupted."""
        live = self.get(cid, user)
        live.pause.set()
        live.council.stop()
        return self.snapshot(live)

    def set_muted(self, cid: str | None, muted: Sequence[str], user: str | None) -> str:
        """Mute exactly these members (the others speak again)."""
        live = self.get(cid, user)
        want = set(muted or ())
        try:
            for m in live.council.members:
                live.council.set_muted(m, m in want)
        except CouncilError as e:
            raise WorkbenchError(str(e)) from None
        return self.snapshot(live)

    def say(self, cid: str | None, text: str, as_voice: str | None, user: str | None) -> str:
        """The user speaks, as themself (``as_voice`` None) or as a voice."""
        live = self.get(cid, user)
        if not isinstance(text, str) or not text.strip():
            raise WorkbenchError("write something to say first")
        if len(text) > MAX_TEXT:
            raise WorkbenchError(f"message too long ({len(text)} > {MAX_TEXT} characters)")
        try:
            if live.running.locked():
                live.council.post(text, as_voice or None)
                live.note = "your words join after this turn"
            else:
                live.council.say(text, as_voice or None)
                self.save(live)
        except CouncilError as e:
            raise WorkbenchError(str(e)) from None
        return self.snapshot(live)

    def open(self, cid: str | None, user: str | None) -> str:
        """The snapshot of a saved council."""
        return self.snapshot(self.get(cid, user))

    def delete(self, cid: str | None, user: str | None) -> None:
        """Forget a council (stopping it first)."""
        live = self.get(cid, user)
        live.council.stop()
        with self._lock:
            self.live.pop(live.id, None)
        self.store.delete(live.id, live.owner)

    # -- export ---------------------------------------------------------------------------------

    def export(self, cid: str | None, kind: str, user: str | None) -> Path:
        """The council as a file: its trace JSONL, Markdown, or an HTML report of the turns."""
        from .export import safe_filename

        live = self.get(cid, user)
        c = live.council
        d = self.wb.new_export_dir()
        if kind == "Markdown":
            out = d / safe_filename(live.title, ".md")
            out.write_text(council_markdown(live.title, c.turns), encoding="utf-8")
            return out
        if kind == "HTML report":
            from ..render import trace_from_text
            from ..render.html import render_report

            text = transcript(c.turns, c.voices)
            out = d / safe_filename(live.title, ".html")
            out.write_text(
                render_report(trace_from_text(text, c.voices), c.voices, title=live.title),
                encoding="utf-8",
            )
            return out
        out = d / safe_filename(live.title, ".jsonl")
        c.trace.save(out)
        return out


def _has_attention(backend: object) -> bool:
    """Whether ``backend`` records attention (the attention resonance measure)."""
    return bool(getattr(getattr(backend, "capabilities", None), "attention", False))


def _backend_label(backend: object) -> str:
    """Which backend and model a member speaks through, as plain text ("llamacpp · x.gguf")."""
    name = str(getattr(backend, "name", "") or "?")
    model = Path(str(getattr(backend, "model_name", "") or "")).name
    return f"{name} · {model}" if model else name


def _settings_label(s: dict[str, Any], replay: str | None = None) -> str:
    """The backend and model the workbench's settings name (before any is loaded)."""
    model = Path(str(s.get("model") or (replay if s["backend"] == "replay" else "") or "")).name
    return f"{s['backend']} · {model}" if model else f"{s['backend']} · default model"


def _page_component(elem_id: str) -> Any | None:
    """A component already laid out on the page being built, by its ``elem_id`` (None when
    there is none): how the tab reads the sidebar's session without app.py passing it."""
    root = gr.context.Context.root_block
    for b in getattr(root, "blocks", {}).values():
        if getattr(b, "elem_id", None) == elem_id:
            return b
    return None


def _no_pick(council: Council, eligible: list[str]) -> str | None:
    """Manual councils in the workbench: nobody speaks until the user picks (Speak next)."""
    return None


def _sid(value: object) -> str | None:
    """The session id the sidebar's dropdown holds (None when it holds none)."""
    return value if isinstance(value, str) and value else None


def _title(prompt: str, limit: int = 60) -> str:
    line = " ".join(prompt.split())
    return "Council: " + (line if len(line) <= limit else line[: limit - 1] + "…")


# ------------------------------------------------------------------------------ the tab

SCRIPT = "council.js"
STYLE = "council.css"


def council_tab(
    wb: Workbench, user_of: Callable[[Any], str | None]
) -> Callable[[], CouncilService]:
    """Lay out the Council tab (call inside the page's ``gr.Tabs``); returns the function that
    wires its events, to be called after the page's own (whose order Gradio numbers)."""

    svc = CouncilService(wb)
    members = svc.member_choices()
    default = [m for m in DEFAULT_MEMBERS if m in members] or members[:4]

    def fail(e: Exception) -> Exception:
        return gr.Error(plain(e), print_exception=False)

    @contextmanager
    def shown() -> Iterator[None]:
        """A user's mistake becomes a toast (one line), not a crash."""
        try:
            yield
        except WorkbenchError as e:
            raise fail(e) from None

    # The sidebar's session dropdown (its value is the session id): the session's voice set
    # gives the members and their bindings. Without a sidebar (a bare page): the server's set.
    session = _page_component("session")

    with gr.Tab("Council", id="council-tab") as c_tab:
        head = f"<style>{asset(STYLE)}</style><script>{asset(SCRIPT)}</script>"
        board = gr.HTML(
            value=svc.snapshot(None),
            html_template='<div class="tf-council" id="tf-council"></div>',
            js_on_load="window.thoughtformCouncil.mount(element, props, watch);",
            head=head,
            elem_id="council",
            apply_default_css=False,
        )
        cid = gr.State(None)
        with gr.Row(equal_height=True):
            with gr.Column(scale=4, min_width=280):
                c_order = gr.HTML(
                    value=svc.order_value(),
                    html_template='<div class="tf-c-order" id="tf-council-order"></div>',
                    # The script comes with the board's head: wait for it if this mounts first.
                    js_on_load="(function go() { var c = window.thoughtformCouncil; "
                    "if (c) c.order(element, props, watch); else setTimeout(go, 50); })();",
                    elem_id="council-order",
                    apply_default_css=False,
                )
                # What the list above writes (a JSON list of the ticked members, in order):
                # in the page but not shown, so the Start button can read it.
                c_members = gr.Textbox(
                    value=json.dumps(default), visible="hidden", elem_id="council-members"
                )
            c_policy = gr.Dropdown(
                list(POLICIES), value="round-robin", label="Policy", elem_id="council-policy"
            )
            c_measure = gr.Radio(
                list(MEASURES), value="echo", label="Resonance", elem_id="council-measure",
                info="echo: any backend; attention: transformers; counterfactual: llamacpp, "
                "transformers (computed when a run ends)",
            )  # fmt: skip
            c_turns = gr.Number(
                value=8, precision=0, minimum=1, maximum=MAX_TURNS, label="Turns",
                elem_id="council-turns",
            )  # fmt: skip
            c_tokens = gr.Number(
                value=DEFAULT_TURN_TOKENS, precision=0, minimum=1, label="Tokens per turn",
                elem_id="council-tokens",
            )  # fmt: skip
        with gr.Row(equal_height=True):
            c_as = gr.Dropdown(
                ["yourself", *members], value="yourself", label="Speak as",
                elem_id="council-as", scale=1,
            )  # fmt: skip
            c_text = gr.Textbox(
                show_label=False,
                placeholder="What you say to the council (Start begins a new one with it)",
                elem_id="council-text",
                lines=1,
                max_lines=4,
                scale=6,
            )
            c_say = gr.Button("Say", elem_id="council-say", scale=1, min_width=70)
        with gr.Row():
            c_start = gr.Button("Start", variant="primary", elem_id="council-start")
            c_pause = gr.Button("Pause", elem_id="council-pause")
            c_resume = gr.Button("Resume", elem_id="council-resume")
            c_stop = gr.Button("Stop", variant="stop", elem_id="council-stop")
        with gr.Row(equal_height=True):
            c_next = gr.Dropdown(members, label="Who speaks next", elem_id="council-next")
            c_force = gr.Button("Speak next", elem_id="council-force")
            c_mute = gr.CheckboxGroup(members, label="Muted", elem_id="council-mute", scale=3)
        with gr.Row(equal_height=True):
            c_saved = gr.Dropdown([], label="Saved councils", elem_id="council-saved", scale=3)
            c_open = gr.Button("Open", elem_id="council-open", size="sm")
            c_kind = gr.Radio(EXPORTS, value=EXPORTS[0], label="Export", elem_id="council-kind")
            c_export = gr.Button("Export", elem_id="council-export", size="sm")
            c_file = gr.File(label="Download", interactive=False, elem_id="council-file")

    def run(gen: Iterator[tuple[str, str]]) -> Iterator[tuple[Any, Any]]:
        with shown():
            yield from gen

    def on_start(
        ms: str,
        policy: str,
        turns: float,
        tokens: float,
        text: str,
        measure: str,
        sid: str | None,
        request: gr.Request,
    ) -> Iterator[tuple[Any, Any, Any]]:
        user = user_of(request)
        first = True
        with shown():
            names = svc.parse_members(ms)
        for pl, c in run(
            svc.start(
                names, policy, int(turns or 8), int(tokens or 0), text, user, measure, _sid(sid)
            )
        ):
            yield pl, c, ("" if first else gr.skip())
            first = False

    def on_resume(c: str | None, turns: float, request: gr.Request) -> Iterator[tuple[Any, Any]]:
        yield from run(svc.resume(c, int(turns or 8), user_of(request)))

    def on_force(c: str | None, name: str | None, request: gr.Request) -> Iterator[Any]:
        if not name:
            raise fail(WorkbenchError("pick who speaks next first"))
        yield from run(svc.speak_next(c, name, user_of(request)))

    def on_pause(c: str | None, request: gr.Request) -> str:
        with shown():
            return svc.pause(c, user_of(request))

    def on_stop(c: str | None, request: gr.Request) -> str:
        with shown():
            return svc.stop(c, user_of(request))

    def on_mute(c: str | None, muted: list[str], request: gr.Request) -> Any:
        if not valid_council_id(c):
            return gr.skip()
        with shown():
            return svc.set_muted(c, muted or [], user_of(request))

    def on_measure(c: str | None, measure: str, request: gr.Request) -> Any:
        if not valid_council_id(c):
            return gr.skip()  # the choice is read again when a council starts
        with shown():
            return svc.set_measure(c, measure, user_of(request))

    def on_say(c: str | None, who: str, text: str, request: gr.Request) -> tuple[str, str]:
        voice = None if who in (None, "", "yourself") else who
        with shown():
            return svc.say(c, text, voice, user_of(request)), ""

    def on_saved(c: str | None, request: gr.Request) -> Any:
        with shown():
            return gr.update(choices=svc.choices(user_of(request)), value=c)

    def member_updates(order: str, muted: Sequence[str] | None = None) -> list[Any]:
        """The member list, its hidden box, and the pickers that name members (``muted``: the
        Muted boxes too, for an opened council)."""
        names = [r["name"] for r in json.loads(order)["voices"]]
        mute: dict[str, Any] = {} if muted is None else {"value": [m for m in muted if m in names]}
        return [
            order,
            svc.members_value(order),
            gr.update(choices=["yourself", *names]),
            gr.update(choices=names),
            gr.update(choices=names, **mute),
        ]

    def on_open(c: str | None, measure: str, request: gr.Request) -> list[Any]:
        user = user_of(request)
        with shown():
            snap = svc.set_measure(c, measure, user)
            live = svc.get(c, user)
            order = svc.order_value(live=live)
        # The member list shows this council's members, in its order (what Start would use).
        return [snap, c, *member_updates(order, sorted(live.council.muted))]

    def on_members(sid: str | None, ms: str, request: gr.Request) -> list[Any]:
        try:  # keep what the list has ticked, in its order
            ticked = svc.parse_members(ms)
        except WorkbenchError:
            ticked = []
        with shown():
            return member_updates(svc.order_value(user_of(request), _sid(sid), ticked=ticked))

    def on_export(c: str | None, kind: str, request: gr.Request) -> str:
        with shown():
            return str(svc.export(c, kind, user_of(request)))

    def wire() -> CouncilService:
        """Register the tab's events (after the page's own)."""
        loop: dict[str, Any] = {
            "show_progress": "hidden",
            "concurrency_id": "council",
            "concurrency_limit": 4,
        }
        sid_in = session if session is not None else gr.State(None)
        started = c_start.click(
            on_start,
            [c_members, c_policy, c_turns, c_tokens, c_text, c_measure, sid_in],
            [board, cid, c_text],
            **loop,
        )
        started.then(on_saved, cid, c_saved, show_progress="hidden")
        c_resume.click(on_resume, [cid, c_turns], [board, cid], **loop)
        c_force.click(on_force, [cid, c_next], [board, cid], **loop)
        now: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        c_pause.click(on_pause, cid, board, **now)
        c_stop.click(on_stop, cid, board, **now)
        c_mute.input(on_mute, [cid, c_mute], board, **now)
        c_measure.input(on_measure, [cid, c_measure], board, **now)
        c_say.click(on_say, [cid, c_as, c_text], [board, c_text], **now)
        c_text.submit(on_say, [cid, c_as, c_text], [board, c_text], **now)
        c_saved.focus(on_saved, cid, c_saved, show_progress="hidden")
        pickers = [c_order, c_members, c_as, c_next, c_mute]
        c_open.click(on_open, [c_saved, c_measure], [board, cid, *pickers], **now)
        # The session's voice set (and its bindings) when the tab is shown or the person picks
        # another session. Not on every programmatic change: redrawing five pickers after each
        # "New session" doubled its time (0.8 -> 1.7 s in Chromium) and browser tests timed out.
        c_tab.select(on_members, [sid_in, c_members], pickers, **now)
        if session is not None:
            session.input(on_members, [session, c_members], pickers, **now)
        c_export.click(on_export, [cid, c_kind], c_file)
        return svc

    return wire
