"""Public views of a workflow snapshot (the `tessera.v1.Workflow` resource). Names are
parsed by :mod:`tessera.resource_names` (re-exported here)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from services.coordinator.state import TS, WorkflowRecord, dict_to_struct
from tessera.resource_names import gate_name, workflow_id
from tessera.v1 import common_pb2, coordinator_pb2, events_pb2

__all__ = ["gate_kind_name", "gate_name", "gate_view", "timestamp", "workflow_id", "workflow_view"]


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    if seconds:
        out.FromMicroseconds(int(seconds * 1e6))
    return out


def _status(error: object) -> status_pb2.Status:
    out = status_pb2.Status(code=error.code, message=error.message)  # type: ignore[attr-defined]
    if getattr(error, "reason", ""):
        out.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="tessera"))  # type: ignore[attr-defined]
    return out


def gate_view(rec: WorkflowRecord, gate_id: str) -> coordinator_pb2.Gate:
    gate = rec.gates[gate_id]
    return coordinator_pb2.Gate(
        name=f"workflows/{rec.id}/gates/{gate.id}",
        task_id=gate.task_id,
        reason=gate.reason,
        state=coordinator_pb2.GateState.ValueType(gate.state),
        decided_by=gate.decided_by,
        comment=gate.comment,
        create_time=timestamp(gate.create_time),
        decide_time=timestamp(gate.decide_time) if gate.decide_time else None,
        kind=events_pb2.GateKind.ValueType(gate.kind),
        approved_by=gate.approvals,
        quorum=gate.quorum,
        expire_time=timestamp(gate.expire_time) if gate.expire_time else None,
        tool=gate.tool,
        arguments=dict_to_struct(gate.arguments) if gate.arguments else None,
        policy_ids=gate.policy_ids,
    )


def workflow_view(rec: WorkflowRecord) -> coordinator_pb2.Workflow:
    view = coordinator_pb2.Workflow(
        name=f"workflows/{rec.id}",
        request_id=rec.request_id,
        state=coordinator_pb2.WorkflowState.ValueType(rec.state),
        plan=rec.graph() if rec.plan else None,
        goal=rec.goal,
        started_by=rec.started_by,
        blackboard=dict_to_struct(rec.blackboard),
        blackboard_version=rec.blackboard_version,
        usage=common_pb2.Usage(
            tokens=rec.usage.tokens,
            cost_micros=rec.usage.cost_micros,
            tool_calls=rec.usage.tool_calls,
        ),
        create_time=timestamp(rec.create_time),
        update_time=timestamp(rec.update_time),
        event_count=rec.seq,
    )
    if rec.deadline:
        view.deadline.CopyFrom(timestamp(rec.deadline))
    view.compensated.extend(rec.compensated)
    view.uncompensated.extend(rec.uncompensated)
    for task in rec.tasks.values():
        status = coordinator_pb2.TaskStatus(
            task_id=task.id,
            capability=task.capability,
            state=coordinator_pb2.TaskState.ValueType(task.state),
            attempts=task.attempts,
            agent=task.agent,
        )
        if task.error is not None:
            status.error.CopyFrom(_status(task.error))
        if task.transient and task.state == TS.TASK_STATE_PENDING:
            status.waiting_reason = task.error.reason if task.error else "UNAVAILABLE"
        if task.retry_at is not None and task.state == TS.TASK_STATE_PENDING:
            status.retry_time.CopyFrom(timestamp(task.retry_at))
        if task.output is not None:
            status.output.CopyFrom(dict_to_struct(task.output))
        view.tasks.append(status)
    view.gates.extend(gate_view(rec, g) for g in rec.gates)
    if rec.result is not None:
        view.result.CopyFrom(dict_to_struct(rec.result))
    if rec.error is not None:
        view.error.CopyFrom(_status(rec.error))
    return view


def gate_kind_name(kind: int) -> str:
    """``GATE_KIND_TOOL_APPROVAL`` -> ``tool_approval`` (the schema's Gate.kind)."""
    return events_pb2.GateKind.Name(kind).removeprefix("GATE_KIND_").lower()  # type: ignore[arg-type]
