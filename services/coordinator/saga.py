"""Compensation (a saga): when a workflow fails or is cancelled after tasks with effects
ran, the compensating capability their contracts name undoes them, latest first, before
the workflow ends; effects that cannot be undone are listed in its end event.

Pure functions over a snapshot, like the rest of the engine: `Emitter.fail` and
`Emitter.cancel` call :func:`compensate`, `next_steps` calls
:func:`finish_compensation` once the compensating tasks ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.coordinator.state import TS, TaskRun, WorkflowRecord, dict_to_struct
from tessera.v1 import common_pb2, events_pb2

if TYPE_CHECKING:
    from services.coordinator.engine import Emitter

COMPENSATION_WINDOW_S = 3600.0
"""How long a failing workflow's compensations may take, from the failure."""
SETTLE_S = 2.0
"""How long after compensation begins the first compensating task may run: the tool
proxy's task-token cache (at most 1 s, services/tool_proxy/tokens.py) plus a margin, so
no call of a token revoked at that moment is still admitted. An effect admitted before
is in flight, and the undoing tool waits for it (``EFFECT_IN_FLIGHT``); without the wait,
a refund landing after its reversal looked would stay unreversed."""
_NO_EFFECT = common_pb2.SIDE_EFFECT_CLASS_READ_ONLY


def _has_effects(task: TaskRun) -> bool:
    return task.attempts > 0 and not task.compensates and task.side_effect_class != _NO_EFFECT


def compensate(em: Emitter, started: events_pb2.CompensationStarted) -> bool:
    """Begin the saga's compensation of a workflow about to end (``started`` says why):
    every task that was attempted and may have had effects gets its contract's
    compensating task, in reverse order of the tasks' ends; those with effects and no
    compensation are listed. False (nothing emitted) when there is nothing to undo or the
    workflow is already compensating."""
    rec = em.rec
    if rec.compensating:
        return False
    candidates = sorted(
        (t for t in rec.tasks.values() if _has_effects(t)),
        key=lambda t: t.ended_at or t.since or 0.0,
        reverse=True,
    )
    undoable = [t for t in candidates if t.compensation]
    if not undoable:
        return False
    for task in undoable:
        started.tasks.add(
            from_task_id=task.id,
            to_task_id=f"{task.id}.undo",
            capability=task.compensation,
            reason=f"compensate {task.capability}",
            input=dict_to_struct(
                {
                    "task_id": task.id,
                    "capability": task.capability,
                    "succeeded": task.state == TS.TASK_STATE_SUCCEEDED,
                    "input": task.input,
                    "output": task.output or {},
                }
            ),
        )
    started.uncompensated.extend(
        t.id for t in candidates if not t.compensation and t.state == TS.TASK_STATE_SUCCEEDED
    )
    started.deadline.FromMicroseconds(int((em.now + COMPENSATION_WINDOW_S) * 1e6))
    started.not_before.FromMicroseconds(int((em.now + SETTLE_S) * 1e6))
    em.emit(compensation_started=started)
    return True


def undo_outcome(rec: WorkflowRecord) -> tuple[list[str], list[str]]:
    """(tasks whose effects were undone, tasks with effects left) for the end event."""
    if not rec.compensating:
        left = [
            t.id
            for t in rec.tasks.values()
            if _has_effects(t) and t.state == TS.TASK_STATE_SUCCEEDED
        ]
        return [], left
    undos = [t for t in rec.tasks.values() if t.compensates]
    done = [t.compensates for t in undos if t.state == TS.TASK_STATE_SUCCEEDED]
    failed = [t.compensates for t in undos if t.state != TS.TASK_STATE_SUCCEEDED]
    return done, [*rec.uncompensated, *failed]


def finish_compensation(em: Emitter) -> None:
    """Every compensating task ran (or gave up): end the workflow as it was ending."""
    rec = em.rec
    if any(t.compensates and not rec.resolved(t.id) for t in rec.tasks.values()):
        return  # a retry's backoff
    ending = rec.ending_event()
    compensated, uncompensated = undo_outcome(rec)
    if ending.HasField("cancelled"):
        cancelled = events_pb2.WorkflowCancelled()
        cancelled.CopyFrom(ending.cancelled)
        cancelled.compensated.extend(compensated)
        cancelled.uncompensated.extend(uncompensated)
        em.emit(workflow_cancelled=cancelled)
        return
    em.emit(
        workflow_failed=events_pb2.WorkflowFailed(
            error=ending.error, compensated=compensated, uncompensated=uncompensated
        )
    )
