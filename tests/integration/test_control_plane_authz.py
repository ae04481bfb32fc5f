"""Governance nobody can walk around, at the coordinator (attacks I7-I8 of RELIABILITY.md):
who may start, cancel and decide what is decided by the policies of policy/ for the
verified principal, every decision is audited in that principal's name, and only the
front door may speak for a person.

A governed mesh (mTLS on every hop, the reference agents) on the real NATS and OpenBao.
People arrive as Envoy forwards them (the harness presents the gateway's certificate
and the claims header; the real Envoy is in test_gateway / test_human_identity)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from tessera.audit import tail
from tessera.runtime.bus import Topology, connect
from tessera.runtime.errors import error_details
from tessera.runtime.principal import CLAIMS_HEADER, encode_claims
from tessera.v1 import audit_pb2, coordinator_pb2, coordinator_pb2_grpc, planner_pb2
from tests.conftest import OpenBao
from tests.integration.harness import REFERENCE_AGENTS, WS, Mesh, reference_agent, task_graph

LOAN = {"applicant": "ACME Ltd", "amount": 250000, "country": "XX"}
APPROVE = coordinator_pb2.GATE_DECISION_APPROVE


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    agents = [reference_agent(name) for name in REFERENCE_AGENTS]
    async with Mesh(nats_url, "authz", agents=agents, vault=openbao) as running:
        yield running


async def start_loan(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> coordinator_pb2.Workflow:
    inputs = struct_pb2.Struct()
    inputs.update({"application": LOAN})
    response = await stub.StartWorkflow(
        coordinator_pb2.StartWorkflowRequest(
            request_id=uuid.uuid4().hex, goal="loan", inputs=inputs
        )
    )
    return response.workflow


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def audited(
    mesh: Mesh,
    resource: str,
    kind: int = audit_pb2.AUDIT_KIND_POLICY_DECISION,
    *,
    count: int = 1,
) -> list[audit_pb2.AuditRecord]:
    """The stored records of ``kind`` about ``resource``, once there are ``count`` of
    them: the coordinator writes decisions in the background (group commit), so a record
    lands shortly after the call it is about; past 10 s, whatever is there."""
    nc = await connect(mesh.nats_url, name="authz-test")
    topology = Topology(mesh.namespace)
    deadline = asyncio.get_running_loop().time() + 10.0
    try:
        while True:
            found = [
                entry.record
                async for entry in tail(nc.jetstream(), topology, n=100_000)
                if entry.record is not None
                and entry.record.kind == kind
                and entry.record.resource == resource
            ]
            if len(found) >= count or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def decisions_about(mesh: Mesh, resource: str, *, count: int) -> list[audit_pb2.AuditRecord]:
    return await audited(mesh, resource, count=count)


async def test_nobody_approves_their_own_loan_nor_one_outside_their_group(mesh: Mesh) -> None:
    # Lee is both a loan officer and a compliance officer: separation of duties still
    # keeps Lee off the gate of Lee's own application.
    lee = await mesh.as_person("lee", ["loan-officers", "compliance-officers"])
    workflow = await start_loan(lee)
    assert workflow.started_by == "lee"
    parked = await mesh.parked(workflow.name)
    (gate,) = [g for g in parked.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]

    own = await refused(
        lee.DecideGate(coordinator_pb2.DecideGateRequest(name=gate.name, decision=APPROVE))
    )
    assert own.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error_details(own)
    assert details.reason == "ACTION_NOT_ALLOWED"
    assert "gate-not-own-workflow" in details.metadata["policies"]

    finn = await mesh.as_person("finn", ["finance-approvers"])
    wrong_group = await refused(
        finn.DecideGate(coordinator_pb2.DecideGateRequest(name=gate.name, decision=APPROVE))
    )
    assert wrong_group.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await mesh.get(workflow.name)).state == WS.WORKFLOW_STATE_WAITING_APPROVAL

    cora = await mesh.as_person("cora", ["compliance-officers"])
    decided = await cora.DecideGate(
        coordinator_pb2.DecideGateRequest(
            name=gate.name,
            decision=APPROVE,
            decided_by="the-ceo",  # ignored: not verified
        )
    )
    assert decided.gate.decided_by == "cora"
    assert (await mesh.finished(workflow.name)).state == WS.WORKFLOW_STATE_SUCCEEDED

    records = await decisions_about(mesh, gate.name, count=3)
    said = [(r.details["principal"], r.outcome) for r in records]
    assert said == [("lee", "deny"), ("finn", "deny"), ("cora", "allow")]


async def test_a_workload_decides_no_gate_and_cannot_speak_for_a_person(mesh: Mesh) -> None:
    workflow = await start_loan(mesh.stub)  # the operator, in its own name
    assert workflow.started_by == "service/operator"
    parked = await mesh.parked(workflow.name)
    (gate,) = [g for g in parked.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]

    request = coordinator_pb2.DecideGateRequest(name=gate.name, decision=APPROVE)
    as_itself = await refused(mesh.stub.DecideGate(request))
    assert as_itself.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "gate-people-only" in error_details(as_itself).metadata["policies"]

    # The operator's certificate with the header only Envoy may send: refused outright.
    forged = encode_claims({"preferred_username": "cora", "groups": ["compliance-officers"]})
    spoofed = await refused(mesh.stub.DecideGate(request, metadata=[(CLAIMS_HEADER, forged)]))
    assert spoofed.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(spoofed).reason == "CLAIMS_NOT_FROM_GATEWAY"
    rejected = await audited(mesh, "DecideGate", audit_pb2.AUDIT_KIND_REQUEST_REJECTED)
    assert any(
        r.outcome == "CLAIMS_NOT_FROM_GATEWAY"
        and r.details["caller"] == "spiffe://tessera.local/service/operator"
        for r in rejected
    ), rejected
    assert (await mesh.get(workflow.name)).state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    await mesh.decide(gate.name, approve=False, by="cora")  # leave nothing parked


async def test_only_the_starter_or_an_operator_cancels(mesh: Mesh) -> None:
    lee = await mesh.as_person("lee", ["loan-officers"])
    workflow = await start_loan(lee)
    finn = await mesh.as_person("finn", ["finance-approvers"])
    cancel = coordinator_pb2.CancelWorkflowRequest(name=workflow.name, reason="not mine")
    other = await refused(finn.CancelWorkflow(cancel))
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await mesh.get(workflow.name)).state != WS.WORKFLOW_STATE_CANCELLED

    cancelled = await lee.CancelWorkflow(
        coordinator_pb2.CancelWorkflowRequest(name=workflow.name, reason="withdrawn")
    )
    assert cancelled.workflow.state in (WS.WORKFLOW_STATE_CANCELLED, WS.WORKFLOW_STATE_COMPENSATING)
    final = await mesh.finished(workflow.name)
    assert final.state in (WS.WORKFLOW_STATE_CANCELLED, WS.WORKFLOW_STATE_COMPENSATED)
    records = await decisions_about(mesh, workflow.name, count=3)
    assert [(r.details["principal"], r.details["action"], r.outcome) for r in records] == [
        ("lee", "start_workflow", "allow"),
        ("finn", "cancel_workflow", "deny"),
        ("lee", "cancel_workflow", "allow"),
    ]


async def test_a_person_starts_only_the_templates_of_their_groups(mesh: Mesh) -> None:
    sam = await mesh.as_person("sam", ["support"])
    denied = await refused(start_loan(sam))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(denied).metadata["action"] == "start_workflow"


FOUR_EYES = task_graph(
    "procurement",  # its gates need two finance approvers (@quorum("2"))
    planner_pb2.TaskSpec(
        id="purchase", kind=planner_pb2.TASK_KIND_APPROVAL_GATE, gate_reason="buy 100 laptops?"
    ),
)


async def test_a_quorum_needs_distinct_approvers_and_one_person_counts_once(mesh: Mesh) -> None:
    started = await mesh.stub.StartWorkflow(
        coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=FOUR_EYES)
    )
    name = started.workflow.name
    parked = await mesh.parked(name)
    (gate,) = parked.gates
    finance = ["finance-approvers"]

    first = await mesh.decide(gate.name, approve=True, by="finn", groups=finance)
    assert first.state == coordinator_pb2.GATE_STATE_PENDING
    assert (list(first.approved_by), first.quorum) == (["finn"], 2)
    again = await mesh.decide(gate.name, approve=True, by="finn", groups=finance)  # no 2nd vote
    assert again.state == coordinator_pb2.GATE_STATE_PENDING
    assert list(again.approved_by) == ["finn"]
    assert (await mesh.get(name)).state == WS.WORKFLOW_STATE_WAITING_APPROVAL

    second = await mesh.decide(gate.name, approve=True, by="fiona", groups=finance)
    assert second.state == coordinator_pb2.GATE_STATE_APPROVED
    assert list(second.approved_by) == ["finn", "fiona"] and second.decided_by == "fiona"
    assert (await mesh.finished(name)).state == WS.WORKFLOW_STATE_SUCCEEDED


async def test_people_read_only_the_workflows_that_are_theirs_to_see(mesh: Mesh) -> None:
    lee = await mesh.as_person("lee", ["loan-officers"])
    workflow = await start_loan(lee)
    assert (await lee.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name=workflow.name))).workflow
    cora = await mesh.as_person("cora", ["compliance-officers"])  # decides loan gates
    await cora.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name=workflow.name))

    sam = await mesh.as_person("sam", ["support"])
    get = await refused(sam.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name=workflow.name)))
    assert get.code() == grpc.StatusCode.PERMISSION_DENIED
    watch = sam.WatchWorkflow(coordinator_pb2.WatchWorkflowRequest(name=workflow.name))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in watch:
            pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await sam.ListWorkflows(coordinator_pb2.ListWorkflowsRequest(page_size=500))
    assert workflow.name not in {w.name for w in listed.workflows}
    mine = await lee.ListWorkflows(coordinator_pb2.ListWorkflowsRequest(page_size=500))
    assert workflow.name in {w.name for w in mine.workflows}
    assert {w.started_by for w in mine.workflows} == {"lee"}
    records = await decisions_about(mesh, workflow.name, count=2)
    assert ("sam", "read_workflow", "deny") in {
        (r.details["principal"], r.details["action"], r.outcome) for r in records
    }
    await mesh.stub.CancelWorkflow(coordinator_pb2.CancelWorkflowRequest(name=workflow.name))


async def test_a_gate_nobody_decides_in_time_resolves_as_rejected(mesh: Mesh) -> None:
    # A replica with a short gate expiry starts the loan: the expiry is fixed for a
    # workflow when it starts, and every replica's timers and workers enforce it.
    hasty = await mesh.add_coordinator(gate_expiry_s=2.0)
    first = mesh.coordinator_address
    await mesh.use_coordinator(hasty.address)
    try:
        workflow = await start_loan(await mesh.as_person("lee", ["loan-officers"]))
    finally:
        await mesh.use_coordinator(first)
    parked = await mesh.parked(workflow.name)
    (gate,) = [g for g in parked.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]
    assert gate.expire_time.ToMicroseconds() - gate.create_time.ToMicroseconds() == 2_000_000

    ended = await mesh.finished(workflow.name)
    assert ended.state == WS.WORKFLOW_STATE_CANCELLED
    (expired,) = [g for g in ended.gates if g.name == gate.name]
    assert expired.state == coordinator_pb2.GATE_STATE_REJECTED
    assert expired.decided_by == "tessera/gate-expiry"
    assert "rejected" in ended.error.message

    cora = await mesh.as_person("cora", ["compliance-officers"])
    late = await refused(
        cora.DecideGate(coordinator_pb2.DecideGateRequest(name=gate.name, decision=APPROVE))
    )
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(late).reason == "GATE_NOT_PENDING"
    approvals = await audited(mesh, gate.name, audit_pb2.AUDIT_KIND_APPROVAL)
    assert [(r.outcome, r.details["decided_by"]) for r in approvals] == [
        ("rejected", "tessera/gate-expiry")
    ]
