"""Reports and replies as JSON, for executors that speak over the broker.

Only plain JSON travels (the broker accepts nothing else from runq); bytes
go as base64. Decoding is strict: a malformed report is an error, never a
half-filled object.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from executors.base import (
    Changes,
    Directive,
    Finished,
    Heartbeat,
    LogWritten,
    PhaseResult,
    Reply,
    Report,
    Started,
    StateWritten,
    StopReason,
    b64,
    unb64,
)
from scheduler.states import Phase

KINDS: dict[type[Any], str] = {
    Started: "started",
    Heartbeat: "heartbeat",
    StateWritten: "state",
    LogWritten: "log",
    Finished: "finished",
}


class BadReport(ValueError):
    """A report or reply that does not decode."""


def _bytes(doc: dict[str, Any], key: str, *, optional: bool = False) -> bytes | None:
    value = doc.get(key)
    if value is None and not optional:
        raise BadReport(f"{key} must be base64 text")
    try:
        return unb64(value)
    except (TypeError, ValueError) as exc:
        raise BadReport(f"{key} is not base64 text: {exc}") from exc


def int_field(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadReport(f"{key} must be a non-negative integer")
    return value


def _str(doc: dict[str, Any], key: str, limit: int = 500) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise BadReport(f"{key} must be text of at most {limit} characters")
    return value


def report_to_json(report: Report) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": KINDS[type(report)], "task_id": report.task_id}
    doc["fence"] = report.fence
    if isinstance(report, Started):
        doc.update(phase=str(report.phase), handle=report.handle)
    elif isinstance(report, Heartbeat):
        doc.update(phase=str(report.phase))
    elif isinstance(report, StateWritten):
        doc.update(serial=report.serial, lineage=report.lineage, content=b64(report.content))
    elif isinstance(report, LogWritten):
        doc.update(phase=str(report.phase), offset=report.offset, content=b64(report.content))
    else:
        result = asdict(report.result)
        result["stopped"] = str(report.result.stopped) if report.result.stopped else None
        doc.update(phase=str(report.phase), result=result, plan=b64(report.plan))
    return doc


def report_from_json(doc: dict[str, Any]) -> Report:
    kind = doc.get("kind")
    task_id, fence = int_field(doc, "task_id"), int_field(doc, "fence")
    try:
        if kind == "state":
            content = _bytes(doc, "content")
            assert content is not None
            return StateWritten(
                task_id, fence, int_field(doc, "serial"), _str(doc, "lineage"), content
            )
        phase = Phase(str(doc.get("phase")))
        if kind == "started":
            return Started(task_id, fence, phase, _str(doc, "handle", 300))
        if kind == "heartbeat":
            return Heartbeat(task_id, fence, phase)
        if kind == "log":
            content = _bytes(doc, "content")
            assert content is not None
            return LogWritten(task_id, fence, phase, int_field(doc, "offset"), content)
        if kind == "finished":
            return Finished(task_id, fence, phase, _result(doc.get("result")), _plan(doc))
    except (TypeError, ValueError) as exc:
        raise BadReport(f"bad {kind} report: {exc}") from exc
    raise BadReport(f"unknown report kind {kind!r}")


def _plan(doc: dict[str, Any]) -> bytes | None:
    return _bytes(doc, "plan", optional=True)


def _result(raw: object) -> PhaseResult:
    if not isinstance(raw, dict):
        raise BadReport("result must be an object")
    changes = raw.get("changes")
    error = raw.get("error")
    if error is not None and not isinstance(error, str):
        raise BadReport("result.error must be text")
    return PhaseResult(
        ok=bool(raw.get("ok")),
        has_changes=bool(raw.get("has_changes")),
        changes=Changes(**{k: int(v) for k, v in changes.items()})
        if isinstance(changes, dict)
        else None,
        error=error[:4000] if error else None,
        stopped=StopReason(raw["stopped"]) if raw.get("stopped") else None,
    )


def reply_to_json(reply: Reply) -> dict[str, Any]:
    return {
        "accepted": reply.accepted,
        "directive": str(reply.directive),
        "reason": reply.reason,
        "stop": str(reply.stop) if reply.stop else None,
    }


def reply_from_json(doc: dict[str, Any]) -> Reply:
    try:
        return Reply(
            accepted=bool(doc["accepted"]),
            directive=Directive(doc["directive"]),
            reason=str(doc.get("reason") or ""),
            stop=StopReason(doc["stop"]) if doc.get("stop") else None,
        )
    except (KeyError, ValueError) as exc:
        raise BadReport(f"bad reply: {exc}") from exc
