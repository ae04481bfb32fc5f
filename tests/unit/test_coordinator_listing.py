"""What the inbox and the workflow list answer, over workflow snapshots: which gates are
offered, in what order, and how filters and page tokens behave."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import timestamp_pb2

from services.coordinator import listing
from services.coordinator.state import GS, WS, GateRec, WorkflowRecord
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import coordinator_pb2, events_pb2, planner_pb2

GK = events_pb2.GateKind


def workflow(
    wf: str, *, created: float, template: str = "support", by: str = "ann"
) -> WorkflowRecord:
    plan = planner_pb2.TaskGraph(template=template)
    return WorkflowRecord(
        id=wf,
        state=WS.WORKFLOW_STATE_WAITING_APPROVAL,
        started_by=by,
        create_time=created,
        plan=base64.b64encode(plan.SerializeToString()).decode(),
    )


def gate(rec: WorkflowRecord, gate_id: str, *, opened: float, **fields: object) -> None:
    rec.gates[gate_id] = GateRec(
        id=gate_id,
        task_id="t",
        reason="r",
        kind=GK.GATE_KIND_TOOL_APPROVAL,
        create_time=opened,
        **fields,
    )


def test_the_inbox_offers_pending_gates_the_caller_may_decide_oldest_first() -> None:
    a, b, ended = workflow("a", created=1), workflow("b", created=2), workflow("c", created=3)
    gate(a, "late", opened=20, tool="billing.issue_refund", arguments={"amount": 1500})
    gate(b, "early", opened=10)
    gate(b, "decided", opened=5, state=GS.GATE_STATE_APPROVED)
    gate(b, "voted", opened=6, approvals=["finn"], quorum=2)
    gate(b, "forbidden", opened=7)
    gate(ended, "gone", opened=1)
    ended.state = WS.WORKFLOW_STATE_CANCELLED
    asked: list[str] = []

    def may_decide(rec: WorkflowRecord, gate_id: str) -> bool:
        asked.append(f"{rec.id}/{gate_id}")
        return gate_id != "forbidden"

    offered = listing.pending_gates([a, b, ended], may_decide, voter="finn", limit=10)
    assert [p.gate.name for p in offered] == ["workflows/b/gates/early", "workflows/a/gates/late"]
    assert offered[1].gate.tool == "billing.issue_refund"
    assert offered[1].gate.arguments["amount"] == 1500
    assert offered[1].workflow == "workflows/a" and offered[1].template == "support"
    # Decided, already-voted and ended gates are never even put to the policy.
    assert sorted(asked) == ["a/late", "b/early", "b/forbidden"]
    assert len(listing.pending_gates([a, b], may_decide, voter="x", limit=1)) == 1


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromSeconds(int(seconds))
    return stamp


def test_filters_select_by_state_template_starter_and_time() -> None:
    rec = workflow("a", created=100, template="loan", by="requester")
    request = coordinator_pb2.ListWorkflowsRequest
    assert listing.matches(rec, request(template="loan", started_by="requester"))
    assert not listing.matches(rec, request(template="support"))
    assert not listing.matches(rec, request(started_by="ann"))
    assert not listing.matches(rec, request(state=WS.WORKFLOW_STATE_SUCCEEDED))
    assert listing.matches(rec, request(create_time_after=_stamp(100)))  # at or after
    assert not listing.matches(rec, request(create_time_after=_stamp(101)))
    assert listing.matches(rec, request(create_time_before=_stamp(101)))
    assert not listing.matches(rec, request(create_time_before=_stamp(100)))  # before only


def test_a_page_token_is_only_good_for_the_filters_it_was_issued_under() -> None:
    first = coordinator_pb2.ListWorkflowsRequest(template="loan")
    token = listing.next_page_token(first, 50)
    again = coordinator_pb2.ListWorkflowsRequest(template="loan", page_token=token)
    assert listing.cursor_of(again) == 50
    changed = coordinator_pb2.ListWorkflowsRequest(template="support", page_token=token)
    with pytest.raises(InvalidArgument):
        listing.cursor_of(changed)
    with pytest.raises(InvalidArgument):
        listing.cursor_of(coordinator_pb2.ListWorkflowsRequest(page_token="not-a-token"))
