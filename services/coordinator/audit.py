"""The coordinator's audit trail: workflow transitions, approvals, task-token issue and
revocation, appended to its own hash chain (tessera.audit) in the background so the
workflow's critical path never waits on it; records are appended in order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

from tessera.audit import AuditWriter
from tessera.v1 import audit_pb2, events_pb2

log = structlog.get_logger(__name__)
AK = audit_pb2.AuditKind

_TRANSITIONS = {
    "workflow_started": "started",
    "workflow_completed": "succeeded",
    "workflow_failed": "failed",
    "workflow_cancelled": "cancelled",
    "gate_opened": "parked",
}
QUEUE_LIMIT = 10_000


class WorkflowAuditor:
    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer
        self._queue: asyncio.Queue[tuple[Any, dict[str, Any]]] = asyncio.Queue(QUEUE_LIMIT)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.writer.start()
        self._task = asyncio.create_task(self._drain(), name="coordinator-audit")

    async def stop(self) -> None:
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()

    def record(self, kind: Any, **fields: Any) -> None:
        try:
            self._queue.put_nowait((kind, fields))
        except asyncio.QueueFull:  # back-pressure would stall workflows; say so loudly
            log.error("audit_backlog_full", dropped_kind=AK.Name(kind))

    def events(self, events: Iterable[events_pb2.WorkflowEvent]) -> None:
        for event in events:
            kind = event.WhichOneof("kind")
            if kind in _TRANSITIONS:
                self.record(
                    AK.AUDIT_KIND_WORKFLOW_TRANSITION,
                    workflow_id=event.workflow_id,
                    task_id=event.gate_opened.task_id,
                    outcome=_TRANSITIONS[kind],
                    resource=f"workflows/{event.workflow_id}",
                    details={"sequence": event.sequence},
                )
            elif kind == "gate_decided":
                decided = event.gate_decided
                self.record(
                    AK.AUDIT_KIND_APPROVAL,
                    workflow_id=event.workflow_id,
                    outcome="approved" if decided.approved else "rejected",
                    resource=f"workflows/{event.workflow_id}/gates/{decided.gate_id}",
                    details={"decided_by": decided.decided_by},
                )
            elif kind == "task_dispatched" and event.task_dispatched.token_accessor:
                self.record(
                    AK.AUDIT_KIND_TOKEN_ISSUED,
                    workflow_id=event.workflow_id,
                    task_id=event.task_dispatched.task_id,
                    outcome="issued",
                    resource=event.task_dispatched.capability,
                    details={
                        "accessor": event.task_dispatched.token_accessor,
                        "attempt": event.task_dispatched.attempt,
                    },
                )

    async def _drain(self) -> None:
        while True:
            kind, fields = await self._queue.get()
            try:
                for attempt in range(5):
                    try:
                        await self.writer.append(kind, **fields)
                        break
                    except Exception as exc:
                        log.warning("audit_append_failed", attempt=attempt, error=repr(exc))
                        await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
            finally:
                self._queue.task_done()
