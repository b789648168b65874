"""The workbench's Council tab: voices take turns as separate speakers (thoughtform.council),
streamed turn by turn into their own blocks, one lane per member, and the resonance matrix.

:class:`CouncilService` does the work (testable without a browser); :func:`council_tab` lays out
the tab and wires it. The page gets whole snapshots of the council (a few KB: the turns, who chose
each speaker and with what probabilities, the echo matrix) as JSON in one ``gr.HTML`` value;
``assets/council.js`` draws them with ``textContent`` only. Councils are saved in the sessions
database (``council_store.py``) after every turn, and export as trace JSONL, Markdown or an HTML
report.
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

from ..backends.base import Sampling
from ..council import DEFAULT_TURN_TOKENS, POLICIES, USER, Council, CouncilError, Turn, transcript
from ..resonance import echo_scores, voice_matrix
from ..voices import VoiceSet
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

    def member_choices(self) -> list[str]:
        """The voices a council may have as members (bracket voices, in lane order)."""
        return [n for n in self.voices.names() if self.voices.voice(n).syntax == "bracket"]

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
            council = Council.from_trace(trace, backend, chooser=_no_pick)
        except CouncilError as e:
            raise WorkbenchError(str(e)) from None
        live = LiveCouncil(cid, owner, str(trace.meta.get("title") or "Council"), council)
        live.state = "stopped" if council.turns and council.turns[-1].interrupted else "idle"
        with self._lock:
            return self.live.setdefault(cid, live)

    def choices(self, user: str | None) -> list[tuple[str, str]]:
        """(label, id) of the user's saved councils, newest first."""
        return [(c.title, c.id) for c in self.store.list(self.wb.owner(user))]

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self, live: LiveCouncil | None, error: str = "") -> str:
        """What the page draws: the whole council as JSON (see ``assets/council.js``)."""
        d: dict[str, Any] = {"n": next(self._nonce), "kind": "council", "error": error[:500]}
        if live is None:
            d.update(id=None, state="idle", members=[], voices={}, turns=[], matrix=None)
            return json.dumps(d, ensure_ascii=False, allow_nan=False)
        c = live.council
        vs = c.voices
        turns = list(c.turns)
        labels = list(c.members)
        if any(t.voice is None for t in turns):
            labels.insert(0, USER)
        labels += [t.voice for t in turns if t.voice is not None and t.voice not in labels]
        matrix = voice_matrix(turns, echo_scores(turns), labels=labels)
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
        )
        return json.dumps(d, ensure_ascii=False, allow_nan=False)

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
    ) -> Iterator[tuple[str, str]]:
        """A new council: the prompt is the user's first message; then ``turns`` turns.
        Yields (snapshot, council id)."""
        owner = self.wb.owner(user)
        if not isinstance(prompt, str) or not prompt.strip():
            raise WorkbenchError("write what you say to the council first")
        if len(prompt) > MAX_TEXT:
            raise WorkbenchError(f"message too long ({len(prompt)} > {MAX_TEXT} characters)")
        s = self.wb.default_settings()
        backend = self.wb.backend_for(s)
        if s["backend"] == "replay":
            max_tokens = 0  # a recording plays whole (as in the chat)
        try:
            council = Council(
                self.voices,
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
            )
        except CouncilError as e:
            raise WorkbenchError(str(e)) from None
        cid = new_council_id()
        live = LiveCouncil(cid, owner, _title(prompt), council)
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
            yield self.snapshot(live), live.id
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
                    yield self.snapshot(live, error), live.id
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
            yield self.snapshot(live, error), live.id
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


def _no_pick(council: Council, eligible: list[str]) -> str | None:
    """Manual councils in the workbench: nobody speaks until the user picks (Speak next)."""
    return None


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
    from .app import asset, plain

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

    with gr.Tab("Council", id="council-tab"):
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
            c_members = gr.Dropdown(
                members,
                value=default,
                multiselect=True,
                label="Members (they are listed, and speak in list policies, in the order picked)",
                elem_id="council-members",
                scale=4,
            )
            c_policy = gr.Dropdown(
                list(POLICIES), value="round-robin", label="Policy", elem_id="council-policy"
            )
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
        ms: list[str], policy: str, turns: float, tokens: float, text: str, request: gr.Request
    ) -> Iterator[tuple[Any, Any, Any]]:
        user = user_of(request)
        first = True
        for pl, c in run(
            svc.start(ms or [], policy, int(turns or 8), int(tokens or 0), text, user)
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

    def on_say(c: str | None, who: str, text: str, request: gr.Request) -> tuple[str, str]:
        voice = None if who in (None, "", "yourself") else who
        with shown():
            return svc.say(c, text, voice, user_of(request)), ""

    def on_saved(c: str | None, request: gr.Request) -> Any:
        with shown():
            return gr.update(choices=svc.choices(user_of(request)), value=c)

    def on_open(c: str | None, request: gr.Request) -> tuple[str, str | None]:
        with shown():
            return svc.open(c, user_of(request)), c

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
        started = c_start.click(
            on_start, [c_members, c_policy, c_turns, c_tokens, c_text], [board, cid, c_text], **loop
        )
        started.then(on_saved, cid, c_saved, show_progress="hidden")
        c_resume.click(on_resume, [cid, c_turns], [board, cid], **loop)
        c_force.click(on_force, [cid, c_next], [board, cid], **loop)
        now: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        c_pause.click(on_pause, cid, board, **now)
        c_stop.click(on_stop, cid, board, **now)
        c_mute.input(on_mute, [cid, c_mute], board, **now)
        c_say.click(on_say, [cid, c_as, c_text], [board, c_text], **now)
        c_text.submit(on_say, [cid, c_as, c_text], [board, c_text], **now)
        c_saved.focus(on_saved, cid, c_saved, show_progress="hidden")
        c_open.click(on_open, c_saved, [board, cid], **now)
        c_export.click(on_export, [cid, c_kind], c_file)
        return svc

    return wire
