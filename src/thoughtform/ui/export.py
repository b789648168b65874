"""Sessions out and in: a reply as a trace (JSONL / HTML report), the session as Markdown,
and a trace or transcript file as a new session."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from ..backends.base import GenerationRequest, Sampling
from ..backends.replay import ReplayBackend
from ..generate import Generation
from ..parse import parse_text
from ..trace import TokenRecord, Trace, TraceError, is_trace_text, parse_trace_lines
from ..voices import VoiceSet
from .store import SessionInfo, Store, StoredMessage

MAX_IMPORT_BYTES = 50 * 1024 * 1024
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class ImportError_(ValueError):
    """A file cannot be imported; the message names the file and the problem."""


def safe_filename(title: str, suffix: str) -> str:
    """A file name made from a title: ASCII letters, digits, ``._-`` only, never a path."""
    stem = _UNSAFE_NAME.sub("-", title).strip("-.")[:60] or "session"
    return f"{stem}{suffix}"


def reply_trace(
    info: SessionInfo,
    msgs: list[StoredMessage],
    which: int,
    voices: VoiceSet,
    store: Store | None = None,
) -> Trace | None:
    """The trace of reply ``which`` (1-based; 0 or out of range = the last reply); with
    ``store``, its meta also holds the reply's loom branches (``branches``: the tree and each
    child's tokens), which :func:`import_file` brings back."""
    replies = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    if not replies:
        return None
    pos = replies[which - 1] if 1 <= which <= len(replies) else replies[-1]
    m = msgs[pos]
    history = [{"role": x.role, "content": x.text} for x in msgs[:pos]]
    meta: dict[str, Any] = {
        "kind": "generation" if m.tokens else "transcript",
        "title": info.title,
        "session": info.id,
        "voices": voices.name,
        "voice_set": voices.to_dict(),
        "messages": history,
        **{k: v for k, v in m.meta.items() if isinstance(k, str) and k not in ("kind",)},
    }
    if store is not None:
        tree = branch_tree(store, info.id, m.id)
        if tree:
            meta["message_id"] = m.id
            meta["branches"] = tree
    if not m.tokens:
        return Trace(meta=meta, segments=parse_text(m.text, voices), source_text=m.text)
    gen = Generation(
        ReplayBackend(trace=Trace(tokens=list(m.tokens))),
        GenerationRequest(sampling=Sampling(max_tokens=0)),
        voices,
    )
    gen.run()
    finish = dict(m.finish) if m.finish else {"reason": "interrupted", "tokens": len(m.tokens)}
    if m.status == "streaming":
        finish = {"reason": "interrupted", "message": "the server stopped mid-reply"}
    tokens = gen.trace.tokens
    for orig, tok in zip(m.tokens, tokens, strict=False):
        tok.t = orig.t
    return Trace(meta=meta, tokens=tokens, segments=gen.trace.segments, finish=finish)


def branch_tree(store: Store, sid: str, root_id: int) -> list[dict[str, Any]]:
    """Every branch grown from reply ``root_id`` (oldest first, parents before children), each
    with its fork, settings and the child reply (text, tokens, finish)."""
    rows = store.branches(sid)
    inside = {root_id}
    mine = []
    for r in rows:
        if r.parent_id in inside:
            inside.add(r.child_id)
            mine.append(r)
    if not mine:
        return []
    by_id = {m.id: m for m in store.messages(sid, branches=True)}
    out = []
    for r in mine:
        c = by_id.get(r.child_id)
        if c is None:
            continue
        out.append(
            {
                **r.to_dict(),
                "reply": {
                    "text": c.text,
                    "status": c.status,
                    "finish": c.finish,
                    "meta": c.meta,
                    "tokens": [t.to_dict() for t in c.tokens],
                },
            }
        )
    return out


def import_branches(store: Store, sid: str, root_id: int, tree: Any) -> int:
    """Re-create exported branches under reply ``root_id`` (ids remapped); returns how many."""
    if not isinstance(tree, list):
        return 0
    new_id: dict[Any, int] = {}
    n = 0
    for b in tree:
        if not isinstance(b, dict) or not isinstance(b.get("reply"), dict):
            continue
        # The exported root's id is not in new_id: its direct branches land on root_id.
        parent = new_id.get(b.get("parent"), root_id)
        reply = b["reply"]
        toks = []
        for i, t in enumerate(reply.get("tokens") or []):
            try:
                rec = TokenRecord.from_dict(t)
            except (KeyError, TypeError, ValueError):
                continue
            rec.index = i
            toks.append(rec)
        meta = reply.get("meta") if isinstance(reply.get("meta"), dict) else {}
        text = reply.get("text") if isinstance(reply.get("text"), str) else ""
        msg = store.add_message(sid, "assistant", text, status="streaming", meta=meta)
        store.append_tokens(msg.id, toks)
        status = reply.get("status") if reply.get("status") in ("done", "cancelled") else "done"
        fin = reply.get("finish") if isinstance(reply.get("finish"), dict) else None
        store.finish_message(msg.id, str(status), fin)
        fork: dict[str, Any] = b["fork"] if isinstance(b.get("fork"), dict) else {"at": 0}
        settings: dict[str, Any] = b["settings"] if isinstance(b.get("settings"), dict) else {}
        store.add_branch(sid, parent, fork, settings, msg.id)
        new_id[b.get("child")] = msg.id
        n += 1
    return n


def _md_escape(s: str) -> str:
    """Text safe in Markdown prose: HTML-escaped and Markdown punctuation backslashed."""
    s = html.escape(s, quote=True)
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", s)


def _fence(text: str) -> str:
    """A fence longer than any run of backticks or tildes in ``text`` (so it cannot be closed)."""
    longest = max((len(m) for m in re.findall(r"~+", text)), default=0)
    return "~" * max(4, longest + 1)


def _md_blocks(text: str, voices: VoiceSet) -> list[str]:
    out: list[str] = []
    for seg in parse_text(text, voices):
        if not seg.text.strip():
            continue
        if seg.voice != voices.default_voice:
            out += [f"**{_md_escape(seg.voice)}**", ""]
        fence = _fence(seg.text)
        out += [f"{fence}text", seg.text.replace("\r", ""), fence, ""]
    return out


def session_markdown(
    info: SessionInfo, msgs: list[StoredMessage], voices: VoiceSet, store: Store | None = None
) -> str:
    """The session as Markdown: one heading per message, each voice's text in a fenced block
    (so no model text can become HTML, a link or an image when the file is rendered); with
    ``store``, each reply's loom branches follow it (one heading per branch)."""
    out = [f"# {_md_escape(info.title)}", ""]
    for m in msgs:
        who = {"user": "You", "assistant": "Model"}.get(m.role, m.role)
        note = "" if m.status == "done" else f" ({_md_escape(m.status)})"
        out += [f"## {_md_escape(who)}{note}", ""]
        out += _md_blocks(m.text, voices)
        if store is None or m.role != "assistant":
            continue
        for b in branch_tree(store, info.id, m.id):
            fork = b.get("fork") or {}
            forced = next(
                (
                    f"{k.replace('_', ' ')}: {fork[k]}"
                    for k in ("token_id", "text", "voice")
                    if fork.get(k) is not None
                ),
                "",
            )
            out += [
                f"### Branch of message {b['parent']} at token {b['fork_at']} ({_md_escape(forced)})",
                "",
            ]
            out += _md_blocks(str(b["reply"]["text"]), voices)
    return "\n".join(out)


def import_file(store: Store, path: str | Path, settings: dict[str, Any]) -> tuple[str, list[str]]:
    """Create a session from a trace JSONL or a plain transcript; returns (id, warnings)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImportError_(f"{p.name}: cannot read: {e.strerror}") from None
    if size > MAX_IMPORT_BYTES:
        raise ImportError_(f"{p.name}: too large ({size // 1_000_000} MB > 50 MB)")
    raw = p.read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    name = re.sub(r"[\x00-\x1f\x7f]", "", Path(p.name).stem)[:80] or "imported"
    warnings: list[str] = []
    if is_trace_text(text[:65536]):
        try:
            trace = parse_trace_lines(text, p.name, errors=warnings)
        except TraceError as e:
            raise ImportError_(str(e)) from None
        title = trace.meta.get("title") if isinstance(trace.meta.get("title"), str) else name
        vs_dict = (
            trace.meta.get("voice_set") if isinstance(trace.meta.get("voice_set"), dict) else None
        )
        sid = store.create_session(title=str(title)[:200], voice_set=vs_dict, settings=settings)
        for m in trace.meta.get("messages") or []:
            if (
                isinstance(m, dict)
                and m.get("role") in ("user", "assistant")
                and isinstance(m.get("content"), str)
            ):
                store.add_message(sid, m["role"], m["content"])
        if trace.tokens:
            finish = trace.finish or {"reason": "interrupted"}
            status = {"stop": "done", "length": "done", "cancelled": "cancelled"}.get(
                str(finish.get("reason")),
                "error" if finish.get("reason") == "error" else "interrupted",
            )
            msg = store.add_message(
                sid, "assistant", trace.text, status="streaming", meta={"imported": p.name}
            )
            store.append_tokens(msg.id, trace.tokens)
            store.finish_message(msg.id, status, finish)
            import_branches(store, sid, msg.id, trace.meta.get("branches"))
        else:
            store.add_message(sid, "assistant", trace.text, meta={"imported": p.name})
        return sid, warnings
    sid = store.create_session(title=name, voice_set=None, settings=settings)
    store.add_message(sid, "assistant", text.replace("\r\n", "\n"), meta={"imported": p.name})
    return sid, warnings
