"""One readable line per workflow event, for `tessera watch` and `tessera demo`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from tessera.v1 import events_pb2


def _compact(message: object, limit: int = 90) -> str:
    text = json_format.MessageToJson(message, indent=None)  # type: ignore[arg-type]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(event: events_pb2.WorkflowEvent) -> tuple[str, str]:
    """(style, text) for one event; style is a rich colour."""
    kind = event.WhichOneof("kind")
    e: Any
    if kind == "workflow_started":
        e = event.workflow_started
        return "bold", f"started from template {e.plan.template!r} ({len(e.plan.tasks)} tasks)"
    if kind == "task_dispatched":
        e = event.task_dispatched
        return "cyan", f"→ {e.task_id}: {e.capability} (attempt {e.attempt})"
    if kind == "task_succeeded":
        e = event.task_succeeded
        keys = ", ".join(sorted(e.blackboard_writes.fields)) or "nothing"
        return "green", f"✓ {e.task_id}: {e.summary or 'done'} (wrote {keys})"
    if kind == "task_failed":
        e = event.task_failed
        then = "will retry" if e.will_retry else "gave up"
        return "red", f"✗ {e.task_id} attempt {e.attempt}: {e.error.message} ({then})"
    if kind == "task_skipped":
        return "yellow", f"- {event.task_skipped.task_id} skipped: {event.task_skipped.reason}"
    if kind == "handoff_routed":
        e = event.handoff_routed
        return "magenta", f"↪ {e.from_task_id} hands off to {e.capability}: {e.reason}"
    if kind == "gate_opened":
        e = event.gate_opened
        return "bold yellow", f"⏸ gate {e.gate_id} opened: {e.reason}"
    if kind == "gate_approval_recorded":
        v = event.gate_approval_recorded
        return "yellow", f"▶ gate {v.gate_id} approved by {v.approved_by} (needs {v.quorum})"
    if kind == "gate_decided":
        e = event.gate_decided
        verdict = "approved" if e.approved else "rejected"
        return "bold yellow", f"▶ gate {e.gate_id} {verdict} by {e.decided_by or 'someone'}"
    if kind == "blackboard_rolled_back":
        e = event.blackboard_rolled_back
        return "red", f"↺ blackboard rolled back to v{e.to_version}: {e.reason}"
    if kind == "guardrail_tripped":
        e = event.guardrail_tripped
        name = events_pb2.Guardrail.Name(e.guardrail).removeprefix("GUARDRAIL_").lower()
        return "bold red", f"⚠ guardrail {name} on {e.task_id}: {e.detail}"
    if kind == "workflow_completed":
        e = event.workflow_completed
        partial = " (partial)" if e.partial else ""
        return "bold green", f"■ completed{partial}: {_compact(e.result)}"
    if kind == "compensation_started":
        c = event.compensation_started
        why = c.cancelled.reason if c.HasField("cancelled") else c.error.message
        undo = ", ".join(t.from_task_id for t in c.tasks)
        return "bold yellow", f"↺ compensating ({why}): undo {undo}" + _left(c.uncompensated)
    if kind == "workflow_failed":
        e = event.workflow_failed
        return "bold red", f"■ failed: {e.error.message}" + _undone(e.compensated, e.uncompensated)
    if kind == "workflow_cancelled":
        e = event.workflow_cancelled
        return "bold red", f"■ cancelled: {e.reason}" + _undone(e.compensated, e.uncompensated)
    return "", kind or "?"


def _left(uncompensated: Sequence[str]) -> str:
    return f"; cannot undo {', '.join(uncompensated)}" if uncompensated else ""


def _undone(compensated: Sequence[str], uncompensated: Sequence[str]) -> str:
    done = f"; undone: {', '.join(compensated)}" if compensated else ""
    return done + (f"; NOT undone: {', '.join(uncompensated)}" if uncompensated else "")


def line(event: events_pb2.WorkflowEvent) -> tuple[str, str]:
    when = datetime.fromtimestamp(event.time.ToMicroseconds() / 1e6, tz=UTC)
    style, text = describe(event)
    return style, f"{when:%H:%M:%S.%f}"[:-3] + f"  #{event.sequence:<3} {text}"
