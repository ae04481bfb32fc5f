"""The coordinator's audit trail: workflow transitions, approvals, task-token issue and
revocation, appended to its own hash chain (tessera.audit) in the background so the
workflow's critical path does not wait on each write; records are appended in order, and
those that queued up while a write ran go together in the next one (group commit).

No record is ever dropped. The backlog is bounded (``queue_limit``): when it is full,
:meth:`WorkflowAuditor.record` waits for room, so a coordinator whose audit stream is down
stops making progress (back-pressure) instead of acting unaudited. The background writer
retries a failed append until it is stored (capped backoff, every failure logged); at
:meth:`WorkflowAuditor.stop` whatever could not be written within ``stop_timeout_s`` is
logged loudly with its count."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import structlog

from tessera.audit import AuditWriter
from tessera.runtime.errors import Unavailable
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
GROUP_COMMIT_S = 0.05
"""How long the first record of a write waits for others to go with it: at most about 20
audit writes a second per coordinator, however many workflows it runs."""
_MAX_BACKOFF_S = 2.0


class WorkflowAuditor:
    def __init__(
        self,
        writer: AuditWriter,
        *,
        queue_limit: int = QUEUE_LIMIT,
        stop_timeout_s: float = 10.0,
        group_commit_s: float = GROUP_COMMIT_S,
    ) -> None:
        self.writer = writer
        self._queue: asyncio.Queue[tuple[Any, dict[str, Any]]] = asyncio.Queue()
        self._room = asyncio.Semaphore(queue_limit)
        """One unit per record queued or being written: the bound on the backlog (a
        record leaves it once stored)."""
        self._pending = 0
        self._task: asyncio.Task[None] | None = None
        self._stop_timeout_s = stop_timeout_s
        self._group_commit_s = group_commit_s
        self._full_since: float | None = None

    @property
    def backlog(self) -> int:
        """Records waiting to be written (or being written)."""
        return self._pending

    async def start(self) -> None:
        await self.writer.start()
        self._task = asyncio.create_task(self._drain(), name="coordinator-audit")

    async def stop(self) -> None:
        """Write the backlog (bounded by ``stop_timeout_s``), then close the writer (its
        deferred records and a final signed checkpoint)."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), self._stop_timeout_s)
            except TimeoutError:
                log.error("audit_backlog_unwritten", records=self.backlog)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Unavailable):  # logged by the writer
            await self.writer.close()

    async def record(self, kind: Any, **fields: Any) -> None:
        """Queue a record; waits while the backlog is full (never drops one)."""
        if self._room.locked():
            if self._full_since is None:
                self._full_since = time.monotonic()
                log.error("audit_backlog_full", waiting_kind=AK.Name(kind))
            await self._room.acquire()
            if self._full_since is not None and not self._room.locked():
                log.warning(
                    "audit_backlog_recovered",
                    waited_s=round(time.monotonic() - self._full_since, 3),
                )
                self._full_since = None
        else:
            await self._room.acquire()  # free: does not wait
        self._pending += 1
        self._queue.put_nowait((kind, fields))

    async def events(self, events: Iterable[events_pb2.WorkflowEvent]) -> None:
        for event in events:
            kind = event.WhichOneof("kind")
            if kind in _TRANSITIONS:
                await self.record(
                    AK.AUDIT_KIND_WORKFLOW_TRANSITION,
                    workflow_id=event.workflow_id,
                    task_id=event.gate_opened.task_id,
                    outcome=_TRANSITIONS[kind],
                    resource=f"workflows/{event.workflow_id}",
                    details={"sequence": event.sequence}
                    | (
                        # Who may read the workflow's trail is decided on these (the
                        # audit service's read_workflow check).
                        {
                            "started_by": event.workflow_started.started_by,
                            "template": event.workflow_started.plan.template,
                        }
                        if kind == "workflow_started"
                        else {}
                    ),
                )
            elif kind == "gate_decided":
                decided = event.gate_decided
                await self.record(
                    AK.AUDIT_KIND_APPROVAL,
                    workflow_id=event.workflow_id,
                    outcome="approved" if decided.approved else "rejected",
                    resource=f"workflows/{event.workflow_id}/gates/{decided.gate_id}",
                    details={"decided_by": decided.decided_by},
                )
            elif kind == "gate_approval_recorded":
                vote = event.gate_approval_recorded
                await self.record(
                    AK.AUDIT_KIND_APPROVAL,
                    workflow_id=event.workflow_id,
                    outcome="approval_recorded",
                    resource=f"workflows/{event.workflow_id}/gates/{vote.gate_id}",
                    details={"approved_by": vote.approved_by, "quorum": vote.quorum},
                )
            elif kind == "task_dispatched" and event.task_dispatched.token_accessor:
                await self.record(
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
            batch = [await self._queue.get()]
            # Group commit: what queues up meanwhile goes in the same write (the older
            # records ride in the ``carried`` field of the newest).
            await asyncio.sleep(self._group_commit_s)
            while len(batch) <= self.writer.max_carried and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._append_until_stored(batch)
            finally:
                self._pending -= len(batch)
                for _ in batch:
                    self._room.release()
                    self._queue.task_done()

    async def _append_until_stored(self, batch: list[tuple[Any, dict[str, Any]]]) -> None:
        *carried, (kind, fields) = batch
        for carried_kind, carried_fields in carried:
            self.writer.defer(carried_kind, **carried_fields)
        attempt = 0
        while True:
            try:
                await self.writer.append(kind, **fields)
                return
            except Exception as exc:
                attempt += 1
                log.warning(
                    "audit_append_failed",
                    attempt=attempt,
                    backlog=self._queue.qsize(),
                    error=type(exc).__name__,
                )
                await asyncio.sleep(min(_MAX_BACKOFF_S, 0.1 * 2 ** min(attempt, 5)))
