"""What ListWorkflows and ListGates answer: filters, page tokens and the inbox.

Pure functions over workflow snapshots; the servicer loads the snapshots and decides
who may see what (the same decision point DecideGate and GetWorkflow use).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

from services.coordinator.state import GS, WorkflowRecord
from services.coordinator.views import gate_kind_name, gate_view, timestamp
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import coordinator_pb2, events_pb2

__all__ = [
    "cursor_of",
    "decide_gate_resource",
    "filters_of",
    "matches",
    "next_page_token",
    "pending_gates",
    "start_matches",
]


def filters_of(request: coordinator_pb2.ListWorkflowsRequest) -> dict[str, Any]:
    """The request's filters, as its page tokens carry them (a token is only good for
    the filters it was issued under)."""
    return {
        "s": int(request.state),
        "t": request.template,
        "b": request.started_by,
        "a": request.create_time_after.ToMicroseconds()
        if request.HasField("create_time_after")
        else None,
        "z": request.create_time_before.ToMicroseconds()
        if request.HasField("create_time_before")
        else None,
    }


def matches(rec: WorkflowRecord, request: coordinator_pb2.ListWorkflowsRequest) -> bool:
    if request.state and rec.state != request.state:
        return False
    if request.template and (not rec.plan or rec.graph().template != request.template):
        return False
    if request.started_by and rec.started_by != request.started_by:
        return False
    created = int(rec.create_time * 1e6)
    if (
        request.HasField("create_time_after")
        and created < request.create_time_after.ToMicroseconds()
    ):
        return False
    before = request.create_time_before
    return not (request.HasField("create_time_before") and created >= before.ToMicroseconds())


def cursor_of(request: coordinator_pb2.ListWorkflowsRequest) -> int | None:
    """Where the page starts: below this history sequence (None: at the newest)."""
    if not request.page_token:
        return None
    try:
        token = json.loads(base64.urlsafe_b64decode(request.page_token))
        before = int(token["b"])
        if before < 1:
            raise ValueError("not a position")
        if token["f"] != filters_of(request):
            raise ValueError("the filters changed")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            "page_token is invalid for this request",
            field_violations=[("page_token", str(exc))],
        ) from exc
    return before


def next_page_token(request: coordinator_pb2.ListWorkflowsRequest, before: int) -> str:
    token = {"b": before, "f": filters_of(request)}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def start_matches(
    started: events_pb2.WorkflowEvent, request: coordinator_pb2.ListWorkflowsRequest
) -> bool:
    """Whether a workflow's first event passes the filters it decides (all but the state),
    so that a page loads only the workflows it may show."""
    plan = started.workflow_started.plan
    if request.template and plan.template != request.template:
        return False
    if request.started_by and started.workflow_started.started_by != request.started_by:
        return False
    created = started.time.ToMicroseconds()
    after = request.create_time_after
    if request.HasField("create_time_after") and created < after.ToMicroseconds():
        return False
    before = request.create_time_before
    return not (request.HasField("create_time_before") and created >= before.ToMicroseconds())


def decide_gate_resource(rec: WorkflowRecord, gate_id: str) -> dict[str, str]:
    """The Gate entity policies decide ``decide_gate`` on (policy/schema.cedarschema)."""
    gate = rec.gates[gate_id]
    task = rec.tasks.get(gate.task_id)
    return {
        "kind": gate_kind_name(gate.kind),
        "template": rec.graph().template if rec.plan else "",
        "started_by": rec.started_by,
        "capability": task.capability if task is not None else "",
        "tool": gate.tool,
    }


def pending_gates(
    records: Iterable[WorkflowRecord],
    may_decide: Callable[[WorkflowRecord, str], bool],
    *,
    voter: str,
    limit: int,
) -> list[coordinator_pb2.PendingGate]:
    """The pending gates of live workflows that ``may_decide`` allows, oldest first. A
    gate ``voter`` already approved toward its quorum is left out: they cannot add to it."""
    found: list[tuple[float, str, coordinator_pb2.PendingGate]] = []
    for rec in records:
        if rec.terminal:
            continue
        for gate_id, gate in rec.gates.items():
            if gate.state != GS.GATE_STATE_PENDING or voter in gate.approvals:
                continue
            if not may_decide(rec, gate_id):
                continue
            item = coordinator_pb2.PendingGate(
                gate=gate_view(rec, gate_id),
                workflow=f"workflows/{rec.id}",
                goal=rec.goal,
                template=rec.graph().template if rec.plan else "",
                started_by=rec.started_by,
                workflow_create_time=timestamp(rec.create_time),
            )
            found.append((gate.create_time, f"{rec.id}/{gate_id}", item))
    found.sort(key=lambda entry: (entry[0], entry[1]))
    return [item for _, _, item in found[:limit]]
