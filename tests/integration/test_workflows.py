"""The four reference workflows, end to end through the planner, the coordinator and the
reference agents, on the real NATS JetStream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from tessera.audit import tail
from tessera.runtime.bus import Topology, connect
from tessera.runtime.errors import error_details
from tessera.v1 import audit_pb2, coordinator_pb2, events_pb2, tool_proxy_pb2, tool_proxy_pb2_grpc
from tests.conftest import OpenBao
from tests.integration.harness import REFERENCE_AGENTS, WS, Mesh, as_dict, reference_agent


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    agents = [reference_agent(name) for name in REFERENCE_AGENTS]
    async with Mesh(nats_url, "wfref", agents=agents, vault=openbao) as running:
        yield running


def kinds(events: list[events_pb2.WorkflowEvent]) -> list[str]:
    return [e.WhichOneof("kind") or "" for e in events]


async def test_support_ticket_is_routed_to_billing_and_answered(mesh: Mesh) -> None:
    name = await mesh.start(
        "support",
        ticket={"id": "T-1", "customer_id": "C-7", "text": "Please refund the double charge"},
    )
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error.message
    board = as_dict(workflow.blackboard)
    assert board["category"] == "billing"
    assert "billing_notes" in board
    assert "reply" in as_dict(workflow.result)
    routed = [
        e.handoff_routed.capability for e in await mesh.events(name) if e.HasField("handoff_routed")
    ]
    assert routed == ["support.billing"]
    # The policies that decided its tool calls: a small refund runs directly.
    assert await allowed_by(mesh, name, "billing.issue_refund") == [["refund-within-limit"]]
    assert await allowed_by(mesh, name, "billing.get_invoices") == [["declared-tool"]]


async def test_ping_pong_ticket_trips_the_loop_guard_and_escalates(mesh: Mesh) -> None:
    name = await mesh.start(
        "support", ticket={"id": "T-2", "customer_id": "C-8", "text": "ping-pong refund please"}
    )
    workflow = await mesh.parked(name)
    assert workflow.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    (gate,) = [g for g in workflow.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]
    assert gate.kind == events_pb2.GATE_KIND_LOOP_ESCALATION
    trips = [
        e.guardrail_tripped.guardrail
        for e in await mesh.events(name)
        if e.HasField("guardrail_tripped")
    ]
    assert trips == [events_pb2.GUARDRAIL_LOOP]
    await mesh.decide(gate.name, approve=False)
    workflow = await mesh.finished(name)
    # Rejected: the billing steps are compensated on the way out. They bounced without
    # refunding, so there is nothing to reverse.
    assert workflow.state == WS.WORKFLOW_STATE_COMPENSATED
    billing = [t.task_id for t in workflow.tasks if t.capability == "support.billing"]
    assert billing and sorted(workflow.compensated) == sorted(billing)
    assert await refunds(mesh, name) == 0
    assert await effects_of(mesh, name, "billing.reverse_refund") == 0


async def test_loan_without_tax_id_is_clarified_and_parks_for_aml_approval(mesh: Mesh) -> None:
    name = await mesh.start(
        "loan", application={"applicant": "ACME Ltd", "amount": 250000, "country": "XX"}
    )
    workflow = await mesh.parked(name)
    assert workflow.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    capabilities = [t.capability for t in workflow.tasks]
    assert "loan.clarification" in capabilities
    assert as_dict(workflow.blackboard)["tax_id"].startswith("TIN-")
    (gate,) = [g for g in workflow.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]
    assert gate.kind == events_pb2.GATE_KIND_OUTPUT_APPROVAL
    assert "AML" in gate.reason
    assert "compliance" not in as_dict(workflow.blackboard)  # held until approved
    await mesh.decide(gate.name, approve=True)
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error.message
    assert as_dict(workflow.blackboard)["compliance"]["aml_flag"] is True
    # Regulated PII for the compliance-tier risk agent: allowed, pii-compliance-only silent.
    assert await allowed_by(mesh, name, "credit.bureau_report") == [["declared-tool"]]


async def test_procurement_acceptance_over_max_budget_is_refused_by_policy_then_renegotiated(
    mesh: Mesh,
) -> None:
    """negotiation-price-cap fires in a real run: the negotiation agent's acceptance of
    the 12,000 list price is refused by policy (max_budget 10,000 reaches the decision
    from the coordinator-issued token), the attempt fails, and the next one's 8,550 is
    accepted, once."""
    name = await mesh.start("procurement", item="laptop", quantity=100, max_budget=10000)
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error.message
    events = await mesh.events(name)
    failed = [e.task_failed for e in events if e.HasField("task_failed")]
    assert len(failed) == 1 and failed[0].will_retry
    assert "refused by policy" in failed[0].error.message
    assert "12000" in failed[0].error.message
    # Refused before the blackboard: the over-budget offer never reached it.
    assert not [e for e in events if e.HasField("blackboard_rolled_back")]
    board = as_dict(workflow.blackboard)
    assert board["offer"] == {"supplier": "globex", "price": 8550}
    assert board["purchase_order"]["price"] == board["offer"]["price"]
    assert await effects_of(mesh, name, "procurement.accept_offer") == 1

    records = await tool_records(mesh, name, "procurement.accept_offer")
    denied = [r for r in records if r.outcome == "denied"]
    assert len(denied) == 1
    assert as_dict(denied[0].details)["policies"] == ["negotiation-price-cap"]
    assert as_dict(denied[0].details)["agent"] == "negotiation"
    assert {"allow", "executed"} <= {r.outcome for r in records}


async def test_parallel_tasks_share_the_workflows_tool_call_budget(mesh: Mesh) -> None:
    """The risk fan-out (credit, fraud, churn in parallel): every attempt's reservation
    comes out of the one workflow budget, and what they reserve and report never
    exceeds it."""
    name = await mesh.start(
        "risk", customer={"id": "43", "income": 40000, "transactions": [10, 20]}
    )
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error.message
    events = await mesh.events(name)
    (started,) = [e.workflow_started for e in events if e.HasField("workflow_started")]
    cap = started.plan.budget.max_tool_calls
    dispatched = [e.task_dispatched for e in events if e.HasField("task_dispatched")]
    assert all(d.HasField("reserved") for d in dispatched)
    parallel = [d for d in dispatched if d.task_id in ("credit", "fraud", "churn")]
    assert sum(d.reserved.tool_calls for d in parallel) <= cap
    assert {d.task_id: d.reserved.tool_calls > 0 for d in parallel} == {
        "credit": True,  # the one that uses a tool
        "fraud": False,
        "churn": False,
    }
    assert workflow.usage.tool_calls <= cap


async def allowed_by(mesh: Mesh, name: str, tool: str) -> list[list[str]]:
    """The determining policies of every allowed call of ``tool`` in this workflow."""
    records = await tool_records(mesh, name, tool)
    return [as_dict(r.details)["policies"] for r in records if r.outcome == "allow"]


async def tool_records(mesh: Mesh, name: str, tool: str) -> list[audit_pb2.AuditRecord]:
    """The tool proxy's audit records of ``tool`` for this workflow (they may trail the
    workflow's end by a few milliseconds: deferred records are flushed within 50 ms)."""
    wf_id = name.split("/")[1]
    nc = await connect(mesh.nats_url, name="test-audit")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 5
        while True:
            found = [
                entry.record
                async for entry in tail(js, Topology(mesh.namespace), n=1_000_000)
                if entry.record is not None
                and entry.record.workflow_id == wf_id
                and entry.record.actor == "tool-proxy"
                and entry.record.resource == tool
            ]
            if "executed" in {r.outcome for r in found} or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def test_risk_fan_out_completes_partially_without_the_slow_branch(mesh: Mesh) -> None:
    name = await mesh.start(
        "risk", customer={"id": "42", "income": 55000, "transactions": [120, 7000, 30]}
    )
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error.message
    result = as_dict(workflow.result)
    assert result["missing"] == ["churn_score"]
    events = await mesh.events(name)
    assert events_pb2.GUARDRAIL_TIMEOUT in [
        e.guardrail_tripped.guardrail for e in events if e.HasField("guardrail_tripped")
    ]
    states = {t.task_id: t.state for t in workflow.tasks}
    assert states["churn"] == coordinator_pb2.TASK_STATE_FAILED
    assert states["aggregate"] == coordinator_pb2.TASK_STATE_SUCCEEDED


async def test_large_refund_waits_for_approval_then_happens_once(mesh: Mesh) -> None:
    name = await mesh.start(
        "support",
        ticket={
            "id": "T-3",
            "customer_id": "C-9",
            "text": "please refund 1500 for the double charge",
        },
    )
    workflow = await mesh.parked(name)
    assert workflow.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    (gate,) = [g for g in workflow.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]
    assert gate.kind == events_pb2.GATE_KIND_TOOL_APPROVAL
    # The tool proxy's typed ApprovalRequired detail reached the coordinator through the
    # billing agent unchanged: the gate is the proxy's and says the policy's reason.
    assert gate.name.rsplit("/", 1)[1].startswith("tool-")
    assert gate.reason == "Refunds above 1000.00 need a human approval"
    assert await refunds(mesh, name) == 0  # nothing moved before a human said so
    decided = await mesh.decide(gate.name, approve=True)
    assert decided.state == coordinator_pb2.GATE_STATE_APPROVED
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error.message
    assert "refunded 1500.00" in as_dict(workflow.blackboard)["billing_notes"]
    assert await refunds(mesh, name) == 1
    # refund-needs-approval parked it; after the approval, refund-approved allowed it.
    records = await tool_records(mesh, name, "billing.issue_refund")
    parked = [r for r in records if r.outcome == "approval_required"]
    assert parked and as_dict(parked[0].details)["policies"] == ["refund-needs-approval"]
    assert await allowed_by(mesh, name, "billing.issue_refund") == [["refund-approved"]]
    # The decision is the proxy's to keep: a repeated DecideGate is answered as the first.
    again = await mesh.decide(gate.name, approve=True)
    assert again.state == coordinator_pb2.GATE_STATE_APPROVED
    assert await refunds(mesh, name) == 1


async def test_a_rejected_big_refund_is_never_paid(mesh: Mesh) -> None:
    name = await mesh.start(
        "support",
        ticket={"id": "T-4", "customer_id": "C-10", "text": "please refund 2500 right now"},
    )
    workflow = await mesh.parked(name)
    (gate,) = [g for g in workflow.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]
    assert gate.kind == events_pb2.GATE_KIND_TOOL_APPROVAL
    await mesh.decide(gate.name, approve=False)
    workflow = await mesh.finished(name)
    assert workflow.state in (WS.WORKFLOW_STATE_CANCELLED, WS.WORKFLOW_STATE_COMPENSATED)
    assert await refunds(mesh, name) == 0


async def test_a_gate_cannot_be_decided_past_the_coordinator(mesh: Mesh) -> None:
    """Only the coordinator hands a decision to the tool proxy: an agent identity calling
    DecideApproval is refused before any handler runs."""
    channel = await mesh.channel_as(
        "agent-billing", mesh.tool_proxy_address, peer="tool-proxy", max_attempts=1
    )
    try:
        stub = tool_proxy_pb2_grpc.ToolProxyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DecideApproval(
                tool_proxy_pb2.DecideApprovalRequest(
                    workflow_id="wf-x",
                    gate_id="tool-0123456789abcdef",
                    decision=tool_proxy_pb2.APPROVAL_DECISION_APPROVE,
                    decided_by="billing",
                ),
                timeout=5,
            )
    finally:
        await channel.close()
    details = error_details(info.value)
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "CALLER_NOT_ALLOWED"


async def test_every_tool_call_of_the_workflows_is_audited_and_the_chain_verifies(
    mesh: Mesh,
) -> None:
    from tessera.audit import verify

    nc = await connect(mesh.nats_url, name="test-audit")
    try:
        report = await verify(nc.jetstream(), Topology(mesh.namespace))
    finally:
        await nc.close()
    assert report.ok, report.issues
    assert sum(chain.records for chain in report.chains) > 0


async def refunds(mesh: Mesh, name: str) -> int:
    """Side effects of billing.issue_refund recorded for this workflow."""
    return await effects_of(mesh, name, "billing.issue_refund")


async def effects_of(mesh: Mesh, name: str, tool: str) -> int:
    """Side effects of ``tool`` recorded for this workflow."""
    wf_id = name.split("/")[1]
    nc = await connect(mesh.nats_url, name="test-effects")
    try:
        js = nc.jetstream()
        topology = Topology(mesh.namespace)
        subject = topology.events_subject("tool.effects")
        try:
            info = await js.stream_info(topology.events_stream, subjects_filter=subject)
        except Exception:
            return 0
        if not info.state.subjects:
            return 0
        sub = await js.subscribe(subject, ordered_consumer=True)
        count = 0
        for _ in range(info.state.subjects.get(subject, 0)):
            msg = await sub.next_msg(timeout=5)
            effect = json.loads(msg.data)
            count += effect.get("tool") == tool and effect.get("workflow_id") == wf_id
        await sub.unsubscribe()
        return count
    finally:
        await nc.close()
