"""The loom in the workbench: branch a stored reply from one of its tokens or voice boundaries,
list a reply's branches as a tree, and compare two of them voice by voice.

The library does the work (:func:`thoughtform.loom.branch`, :func:`thoughtform.loom.compare`);
this module rebuilds the parent :class:`~thoughtform.trace.Trace` from the session (its tokens,
and the request rebuilt from the history before it with the session's settings), stores each
child as an ordinary assistant message plus a row of the ``branches`` table, and answers the
page's ``tf_loom`` server function (``assets/loom.js``).
"""

from __future__ import annotations

import time
from typing import Any

from ..backends.base import Message
from ..conversation import build_request
from ..generate import request_meta
from ..loom import Fork, LoomError, branch, check_branch_backend, compare
from ..trace import Trace
from ..voices import VoiceSet
from .export import reply_trace
from .service import Workbench, WorkbenchError
from .store import BranchRow, SessionInfo, StoredMessage
from .stream import Encoder

ACTIONS = ("family", "families", "branch", "compare")
MAX_PAGE_CHILDREN = 4  # children one click may ask for (each is a full reply)
QUEUE_WAIT_S = 120.0  # how long a branch waits for the model behind other replies


def _session(wb: Workbench, sid: Any, user: str | None) -> SessionInfo:
    info = wb.session_info(sid if isinstance(sid, str) else None, user)
    if info is None:
        raise WorkbenchError("no such session")
    return info


def _root(rows: list[BranchRow], mid: int) -> int:
    """The message a branch family grows from (a reply of the conversation itself)."""
    parent = {r.child_id: r.parent_id for r in rows}
    seen = set()
    while mid in parent and mid not in seen:
        seen.add(mid)
        mid = parent[mid]
    return mid


def _history(msgs: list[StoredMessage], root: StoredMessage) -> list[Message]:
    """The conversation before a reply (what its request was built from)."""
    return [
        Message(m.role, m.text)
        for m in msgs
        if m.seq < root.seq and m.role in ("user", "assistant") and m.text
    ]


def parent_trace(
    wb: Workbench, info: SessionInfo, message_id: int, vs: VoiceSet
) -> tuple[Trace, dict[str, Any]]:
    """A stored reply as the parent of a branch: its tokens and the request that made it
    (rebuilt from the history before its family's root with the session's settings); and the
    settings used."""
    allm = wb.store.messages(info.id, branches=True)
    by_id = {m.id: m for m in allm}
    m = by_id.get(int(message_id))
    if m is None or m.role != "assistant":
        raise WorkbenchError(f"no reply {message_id} in this session")
    if not m.tokens:
        raise WorkbenchError("this reply has no tokens to branch from (a transcript)")
    root = by_id[_root(wb.store.branches(info.id), m.id)]
    main = wb.store.messages(info.id, tokens=False)
    s = wb.settings_of(info)
    # A branch explores the reply as it was: no pending "next voice" of the session.
    s = {**s, "next_voice": None}
    request = build_request(wb.chat_settings(s, vs), vs, _history(main, root))
    meta = {
        **request_meta(request),
        "voices": vs.name,
        "voice_set": vs.to_dict(),
        "session": info.id,
        "id": str(m.id),
    }
    return Trace(meta=meta, tokens=list(m.tokens), finish=m.finish), s


def resolve_fork(parent: Trace, spec: dict[str, Any]) -> Fork:
    """A :class:`Fork` from the page's mapping: ``at`` plus ``token_id``, ``text``, ``voice``, or
    ``alt`` (the text of an alternative recorded at ``at``: its token id)."""
    if not isinstance(spec, dict):
        raise WorkbenchError("a fork is a mapping")
    try:
        at = int(spec.get("at"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WorkbenchError("a fork needs a token index 'at'") from None
    if not 0 <= at <= len(parent.tokens):
        raise WorkbenchError(f"token {at} is outside this reply's {len(parent.tokens)} tokens")
    alt = spec.get("alt")
    if isinstance(alt, str):
        if at >= len(parent.tokens):
            raise WorkbenchError("no alternatives after the last token")
        for a in parent.tokens[at].top:
            if a.text == alt and a.token_id is not None:
                return Fork(at=at, token_id=int(a.token_id))
        for a in parent.tokens[at].top:
            if a.text == alt and a.token_id is None and alt:
                # A server that reports no token ids (openai): the alternative is forced as text.
                return Fork(at=at, text=a.bytes.decode("utf-8", "replace") if a.bytes else alt)
        raise WorkbenchError(f"no recorded alternative {alt[:40]!r} at token {at}")
    try:
        return Fork.from_dict({**spec, "at": at})
    except LoomError as e:
        raise WorkbenchError(str(e)) from None


def branch_message(
    wb: Workbench,
    sid: str,
    message_id: int,
    fork_dict: dict[str, Any],
    n: int = 1,
    user: str | None = None,
) -> list[int]:
    """Branch reply ``message_id`` at ``fork_dict`` into ``n`` children with the session's
    backend (llamacpp, transformers or openai); stores each child (an assistant message and a
    branch row) and returns their message ids."""
    info = _session(wb, sid, user)
    vs = wb.voices_of(info)
    parent, s = parent_trace(wb, info, message_id, vs)
    fork = resolve_fork(parent, fork_dict)
    if not 1 <= int(n) <= MAX_PAGE_CHILDREN:
        raise WorkbenchError(f"between 1 and {MAX_PAGE_CHILDREN} branches at once")
    backend = wb.backend_for(s)
    try:
        check_branch_backend(backend)
    except Exception as e:
        raise WorkbenchError(str(e)) from None
    earlier = [r for r in wb.store.branches(info.id) if r.parent_id == int(message_id)]
    # Each click gets new seeds: the same fork clicked twice gives two different children.
    seed = int(s.get("seed") or 0) + 1 + sum(1 for _ in earlier)
    lock = wb._lock_for(info.id)
    if not lock.acquire(timeout=30):
        raise WorkbenchError("this session is busy with another reply")
    ticket = wb.queue.join(wb.owner(user) or "")
    try:
        deadline = time.monotonic() + QUEUE_WAIT_S
        ahead = wb.queue.wait(ticket, None, 0)
        while ahead is not None:
            if time.monotonic() > deadline:
                raise WorkbenchError(f"the model stayed busy ({ahead} replies ahead): try again")
            ahead = wb.queue.wait(ticket, ahead, 1.0)
        try:
            children = branch(
                backend,
                parent,
                fork,
                n=int(n),
                seed=seed,
                max_tokens=int(s["max_tokens"]),
                voices=vs,
                parent_id=str(message_id),
            )
        except LoomError as e:
            raise WorkbenchError(str(e)) from None
    finally:
        wb.queue.leave(ticket)
        lock.release()
    settings = {
        k: s.get(k) for k in ("backend", "model", "temperature", "top_p", "top_k", "max_tokens")
    }
    out: list[int] = []
    for child in children:
        bmeta = child.meta.get("branch") or {}
        settings_i = {**settings, "seed": bmeta.get("seed")}
        msg = wb.store.add_message(
            info.id,
            "assistant",
            child.text,
            status="streaming",
            meta={"backend": s["backend"], "model": s.get("model") or None, "branch": bmeta},
        )
        wb.store.append_tokens(msg.id, child.tokens)
        finish = dict(child.finish or {"reason": "stop"})
        wb.store.finish_message(msg.id, "done", finish)
        wb.store.add_branch(info.id, int(message_id), fork.to_dict(), settings_i, msg.id)
        out.append(msg.id)
    return out


def _view(info: SessionInfo, m: StoredMessage, vs: VoiceSet, enc: Encoder) -> dict[str, Any]:
    """One family member for the page: its voice blocks (text, colour) with where each starts."""
    tr = reply_trace(info, [m], 0, vs)
    segs = []
    if tr is not None:
        for g in tr.segments:
            if g.text.strip():
                segs.append([g.voice, enc.colors.color(g.voice), g.text, g.start])
    return {"id": m.id, "status": m.status, "segments": segs, "tokens": len(m.tokens)}


def family(wb: Workbench, sid: Any, message_id: Any, user: str | None = None) -> dict[str, Any]:
    """A reply's branch tree: its root first, then every branch in creation order, each with its
    parent, depth, fork (``Fork.to_dict`` and a one-line label) and its blocks."""
    info = _session(wb, sid, user)
    vs = wb.voices_of(info)
    rows = wb.store.branches(info.id)
    try:
        root_id = _root(rows, int(message_id))
    except (TypeError, ValueError):
        raise WorkbenchError("bad message id") from None
    allm = {m.id: m for m in wb.store.messages(info.id, branches=True)}
    if root_id not in allm:
        raise WorkbenchError(f"no reply {message_id} in this session")
    enc = Encoder(vs)
    members = [{**_view(info, allm[root_id], vs, enc), "parent": None, "depth": 0, "fork": None}]
    depth = {root_id: 0}
    for r in rows:  # oldest first: a parent is always listed before its branches
        if r.parent_id in depth and r.child_id in allm:
            depth[r.child_id] = depth[r.parent_id] + 1
            label = Fork.from_dict(r.fork).describe()
            members.append(
                {
                    **_view(info, allm[r.child_id], vs, enc),
                    "parent": r.parent_id,
                    "depth": depth[r.child_id],
                    "fork": r.fork,
                    "label": label,
                    "settings": r.settings,
                }
            )
    return {"root": root_id, "members": members}


def families(wb: Workbench, sid: Any, user: str | None = None) -> dict[str, int]:
    """How many versions each reply with branches has (root id -> root + branches)."""
    info = _session(wb, sid, user)
    rows = wb.store.branches(info.id)
    out: dict[str, int] = {}
    for r in rows:
        root = str(_root(rows, r.child_id))
        out[root] = out.get(root, 1) + 1
    return out


def compare_messages(
    wb: Workbench, sid: Any, a_id: Any, b_id: Any, user: str | None = None
) -> dict[str, Any]:
    """Two replies of one family compared from their fork (``thoughtform.loom.compare``), with
    each lane's blocks and the character offset of the fork in each (to align the lanes)."""
    info = _session(wb, sid, user)
    vs = wb.voices_of(info)
    allm = {m.id: m for m in wb.store.messages(info.id, branches=True)}
    try:
        ma, mb = allm[int(a_id)], allm[int(b_id)]
    except (KeyError, TypeError, ValueError):
        raise WorkbenchError("compare needs two replies of this session") from None
    ta, tb = reply_trace(info, [ma], 0, vs), reply_trace(info, [mb], 0, vs)
    if ta is None or tb is None or not ta.tokens or not tb.tokens:
        raise WorkbenchError("compare needs two replies with tokens")
    result = compare(ta, tb)
    at = int(result["fork"])
    enc = Encoder(vs)
    prefix = "".join(t.text for t in ta.tokens[:at])
    return {
        "compare": result,
        "prefix": prefix[-80:],  # the shared text just before the fork (both lanes start there)
        "a": {**_view(info, ma, vs, enc), "fork_char": sum(len(t.text) for t in ta.tokens[:at])},
        "b": {**_view(info, mb, vs, enc), "fork_char": sum(len(t.text) for t in tb.tokens[:at])},
    }


def loom_action(wb: Workbench, args: Any, user: str | None) -> dict[str, Any]:
    """The page's loom call: ``[action, session, ...]`` with action ``family`` (message id),
    ``families``, ``branch`` (message id, fork mapping, n) or ``compare`` (two message ids).
    Answers ``{"ok": True, ...}`` or ``{"ok": False, "error": one line}``."""
    if not isinstance(args, list) or not args or args[0] not in ACTIONS:
        return {"ok": False, "error": "bad loom request"}
    action = args[0]
    try:
        if action == "families" and len(args) == 2:
            return {"ok": True, "families": families(wb, args[1], user)}
        if action == "family" and len(args) == 3:
            return {"ok": True, **family(wb, args[1], args[2], user)}
        if action == "branch" and len(args) == 5:
            _, sid, mid, fork, n = args
            ids = branch_message(wb, sid, int(mid), fork, int(n or 1), user)
            return {"ok": True, "children": ids, **family(wb, sid, mid, user)}
        if action == "compare" and len(args) == 4:
            return {"ok": True, **compare_messages(wb, args[1], args[2], args[3], user)}
    except WorkbenchError as e:
        return {"ok": False, "error": str(e)[:300]}
    except (TypeError, ValueError) as e:
        return {"ok": False, "error": f"bad loom request: {str(e)[:200]}"}
    return {"ok": False, "error": "bad loom request"}
