"""The legend's steering controls on the server: "next" and "mute" clicks from the page
(``assets/steer.js``, through the ``tf_steer`` server function in ``app.py``) go to the
Workbench's steering methods; the answer is the session's steering state for the chips."""

from __future__ import annotations

from typing import Any

from .service import Workbench, WorkbenchError

ACTIONS = ("next", "mute", "state")


def steer_state(wb: Workbench, sid: str, user: str | None) -> dict[str, Any]:
    """What the legend shows for a session: its muted voices and the voice that opens next."""
    info = wb.session_info(sid, user)
    if info is None:
        raise WorkbenchError("no such session")
    s = wb.settings_of(info)
    return {"muted": list(s.get("muted") or []), "next": s.get("next_voice") or None}


def steer_action(
    wb: Workbench, sid: Any, action: Any, voice: Any, user: str | None
) -> dict[str, Any]:
    """Apply one legend click: ``next`` (again on the same voice clears it), ``mute`` (toggles)
    or ``state`` (nothing changes). Returns the state after it, with ``ok`` and, on a refusal,
    ``error`` (one line for the page)."""
    if not isinstance(sid, str) or action not in ACTIONS:
        return {"ok": False, "error": "bad steering request", "muted": [], "next": None}
    name = voice if isinstance(voice, str) else ""
    try:
        before = steer_state(wb, sid, user)
        live: str | None = None
        if action == "next":
            run = wb.active.get(sid)
            streaming = run is not None and not run.done
            # A second click on the pending voice clears it; while a reply streams every click
            # forces the next block of that reply.
            clear = not streaming and before["next"] is not None and before["next"] == name
            got = wb.set_next_voice(sid, None if clear else name, user)
            live = got if streaming else None
        elif action == "mute":
            wb.toggle_mute(sid, name, user)
        state = steer_state(wb, sid, user)
        if live is not None:
            state["next"] = live
        return {"ok": True, **state}
    except WorkbenchError as e:
        return {"ok": False, "error": str(e)[:300], "muted": [], "next": None}
