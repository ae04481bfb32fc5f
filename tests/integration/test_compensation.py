"""Sagas of the reference workflows on the real mesh (NATS, OpenBao, policy service, tool
proxy, coordinator and the reference agents): a support workflow that refunded and then
fails or is cancelled has its refund reversed, exactly once, and ends COMPENSATED; one
that refunded nothing ends COMPENSATED with nothing reversed. Effects are counted where
the tools record them (the outbox), the reversal's governance in the audit trail."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from nats.js import JetStreamContext

from services.tool_proxy.idempotency import effect_id
from tessera.agent import Agent, TaskContext, TaskResult
from tessera.audit import tail
from tessera.runtime.bus import Topology, connect
from tessera.runtime.errors import FailedPrecondition
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    audit_pb2,
    common_pb2,
    coordinator_pb2,
    events_pb2,
    planner_pb2,
    tool_proxy_pb2,
    tool_proxy_pb2_grpc,
)
from tessera.vault import VaultClient
from tests.conftest import OpenBao
from tests.end_of_run import read_effects
from tests.integration.harness import (
    REFERENCE_AGENTS,
    WS,
    Mesh,
    as_dict,
    reference_agent,
    task,
    task_graph,
)

pytestmark = pytest.mark.integration

REFUND = "billing.issue_refund"
REVERSE = "billing.reverse_refund"
# The support template's triage step: the tools of its whole chain and its compensations.
SUPPORT_TOOLS = ["crm.lookup_customer", "billing.get_invoices", REFUND, REVERSE]

warehouse = Agent("warehouse", version="1.0.0")


@warehouse.capability("saga.reject", version="1.0.0", side_effect="read_only", timeout_s=5)
async def reject(ctx: TaskContext) -> TaskResult:
    """A later step that fails for good (not a transient fault: no retry helps)."""
    raise FailedPrecondition("the warehouse rejected the ticket", reason="TICKET_REJECTED")


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    agents = [reference_agent(name) for name in REFERENCE_AGENTS] + [warehouse]
    async with Mesh(nats_url, "saga", agents=agents, vault=openbao) as running:
        yield running


@pytest.fixture(scope="module")
async def js(mesh: Mesh) -> AsyncIterator[JetStreamContext]:
    nc = await connect(mesh.nats_url, name="test-compensation")
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


# -- helpers -------------------------------------------------------------------------------


def support_plan(text: str, *, then: str) -> planner_pb2.TaskGraph:
    """triage (→ billing) and then ``then``: "reject" (a step that fails for good) or
    "gate" (a human approval step the workflow parks on)."""
    triage = task("triage", "support.triage")
    triage.tools.extend(SUPPORT_TOOLS)
    if then == "reject":
        after = task("ship", "saga.reject", "triage", max_attempts=1, timeout_s=5)
    else:
        after = planner_pb2.TaskSpec(
            id="sign_off",
            kind=planner_pb2.TASK_KIND_APPROVAL_GATE,
            depends_on=["triage"],
            gate_reason="a supervisor signs the ticket off",
        )
    graph = task_graph("support", triage, after)
    graph.blackboard.update(
        {"ticket": {"id": "T-" + uuid.uuid4().hex[:6], "customer_id": "C-7", "text": text}}
    )
    return graph


async def start(mesh: Mesh, graph: planner_pb2.TaskGraph) -> str:
    response = await mesh.stub.StartWorkflow(
        coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=graph)
    )
    return response.workflow.name


async def cancel(mesh: Mesh, name: str) -> None:
    await mesh.stub.CancelWorkflow(
        coordinator_pb2.CancelWorkflowRequest(name=name, reason="the customer withdrew")
    )


def topology(mesh: Mesh) -> Topology:
    return Topology(mesh.namespace)


def wf_id(name: str) -> str:
    return name.split("/")[1]


async def effects(js: JetStreamContext, topology: Topology, wf: str) -> list[dict[str, Any]]:
    """What the tools recorded in the outbox for workflow ``wf``."""
    return await read_effects(js, topology, {wf})


def by_tool(found: list[dict[str, Any]], tool: str) -> list[dict[str, Any]]:
    return [e for e in found if e["tool"] == tool]


async def tool_records(
    js: JetStreamContext, topology: Topology, wf: str, tool: str
) -> list[audit_pb2.AuditRecord]:
    return [
        entry.record
        async for entry in tail(js, topology, n=1_000_000)
        if entry.record is not None
        and entry.record.workflow_id == wf
        and entry.record.actor == "tool-proxy"
        and entry.record.resource == tool
    ]


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds (for records written after the call returned)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def status(workflow: coordinator_pb2.Workflow, capability: str) -> coordinator_pb2.TaskStatus:
    (found,) = [t for t in workflow.tasks if t.capability == capability]
    return found


# -- stories -------------------------------------------------------------------------------

FAILS = "a later step fails"
CANCELLED = "the workflow is cancelled on a gate"


async def run_until_ended(mesh: Mesh, text: str, ending: str) -> str:
    """Start a support workflow for a ticket with ``text`` and end it by ``ending``;
    returns its name once it ended."""
    if ending == FAILS:
        name = await start(mesh, support_plan(text, then="reject"))
        await mesh.finished(name, timeout=10)
        return name
    name = await start(mesh, support_plan(text, then="gate"))
    parked = await mesh.parked(name)
    assert parked.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    await cancel(mesh, name)
    await mesh.finished(name)
    return name


@pytest.mark.parametrize("ending", [FAILS, CANCELLED])
async def test_a_refund_is_reversed_once_when_the_workflow_does_not_go_through(
    mesh: Mesh, js: JetStreamContext, ending: str
) -> None:
    name = await run_until_ended(mesh, "please refund 25", ending)
    workflow = await mesh.get(name)

    assert workflow.state == WS.WORKFLOW_STATE_COMPENSATED, workflow.error.message
    billing = status(workflow, "support.billing")
    undo = status(workflow, "support.billing.reverse")
    assert list(workflow.compensated) == [billing.task_id]
    assert list(workflow.uncompensated) == []
    assert undo.state == coordinator_pb2.TASK_STATE_SUCCEEDED
    assert as_dict(undo.output)["reversed"] is True

    found = await effects(js, topology(mesh), wf_id(name))
    (refund,) = by_tool(found, REFUND)
    (reversal,) = by_tool(found, REVERSE)
    assert refund["idempotency_key"] == f"refund/{billing.task_id}"
    assert refund["effect"]["amount"] == 25
    assert reversal["effect"]["refund_effect_id"] == refund["effect_id"]
    assert reversal["effect"]["refund_id"] == refund["effect"]["refund_id"]
    assert reversal["effect"]["amount"] == refund["effect"]["amount"]
    assert reversal["task_id"] == undo.task_id
    assert reversal["agent"] == "billing"

    # Governed like any call: allowed by the reversal policy, then executed.
    async def audited() -> bool:
        records = await tool_records(js, topology(mesh), wf_id(name), REVERSE)
        return {"allow", "executed"} <= {r.outcome for r in records}

    await eventually(audited)
    records = await tool_records(js, topology(mesh), wf_id(name), REVERSE)
    (allow,) = [r for r in records if r.outcome == "allow"]
    (executed,) = [r for r in records if r.outcome == "executed"]
    assert allow.task_id == undo.task_id
    assert executed.decision_id == allow.decision_id == reversal["decision_id"]
    assert as_dict(allow.details)["policies"] == ["refund-reversal"]


@pytest.mark.parametrize(
    ("text", "ending", "gate_kind"),
    [
        # billing reviewed the invoices and refunded nothing
        ("wrong invoice address", FAILS, 0),
        ("wrong invoice address", CANCELLED, events_pb2.GATE_KIND_APPROVAL_STEP),
        # the refund (above 1,000) still waits for a human when the workflow is cancelled
        ("please refund 1500", CANCELLED, events_pb2.GATE_KIND_TOOL_APPROVAL),
    ],
)
async def test_nothing_is_reversed_where_no_refund_was_made(
    mesh: Mesh, js: JetStreamContext, text: str, ending: str, gate_kind: int
) -> None:
    name = await run_until_ended(mesh, text, ending)
    workflow = await mesh.get(name)

    # The billing task was attempted, so its compensation ran, and found nothing to undo.
    assert workflow.state == WS.WORKFLOW_STATE_COMPENSATED, workflow.error.message
    if gate_kind:
        assert [g.kind for g in workflow.gates] == [gate_kind]
    undo = status(workflow, "support.billing.reverse")
    assert undo.state == coordinator_pb2.TASK_STATE_SUCCEEDED
    assert as_dict(undo.output)["reversed"] is False
    assert list(workflow.compensated) == [status(workflow, "support.billing").task_id]
    assert await effects(js, topology(mesh), wf_id(name)) == []


async def test_a_compensation_run_twice_reverses_once(
    mesh: Mesh, js: JetStreamContext, openbao: OpenBao
) -> None:
    name = await run_until_ended(mesh, "please refund 40", CANCELLED)
    workflow = await mesh.get(name)
    assert workflow.state == WS.WORKFLOW_STATE_COMPENSATED, workflow.error.message
    undo = status(workflow, "support.billing.reverse")
    first = as_dict(undo.output)
    assert first["reversed"] is True
    (started,) = [
        e.compensation_started
        for e in await mesh.events(name)
        if e.HasField("compensation_started")
    ]
    (compensation,) = started.tasks
    wf = wf_id(name)

    # The compensation is delivered again (a new attempt, with a new task token).
    vault = await VaultClient.from_approle_file(openbao.addr, mesh.approles["coordinator"])
    try:
        token = await vault.create_task_token(
            tools=[REVERSE],
            ttl_s=60,
            num_uses=2,
            meta={"workflow": wf, "task": undo.task_id, "agent": "billing", "tier": "standard"},
        )
    finally:
        await vault.close()
    request = agent_pb2.ExecuteTaskRequest(
        context=common_pb2.RequestContext(workflow_id=wf, task_id=undo.task_id),
        capability="support.billing.reverse",
        attempt=undo.attempts + 1,
        input=common_pb2.Payload(json=compensation.input),
        task_token=token.token,
        tool_proxy_endpoint=mesh.tool_proxy_address,
    )
    endpoint = reference_agent("billing").endpoint
    async with await mesh.channel_as("coordinator", endpoint, peer="agent-billing") as channel:
        again = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteTask(request, timeout=10)
    assert json_format.MessageToDict(again.output.json) == first  # that same reversal

    # Even under another idempotency key, the refund is reversed only once.
    refund_key = f"refund/{compensation.input['task_id']}"
    arguments = struct_pb2.Struct()
    arguments.update({"refund_idempotency_key": refund_key})
    call = tool_proxy_pb2.InvokeToolRequest(
        context=common_pb2.RequestContext(workflow_id=wf, task_id=undo.task_id),
        tool=REVERSE,
        arguments=arguments,
        idempotency_key="reverse/by-hand",
    )
    async with await mesh.channel_as(
        "agent-billing", mesh.tool_proxy_address, peer="tool-proxy"
    ) as channel:
        by_hand = await tool_proxy_pb2_grpc.ToolProxyServiceStub(channel).InvokeTool(
            call, metadata=((TASK_TOKEN_METADATA, token.token),), timeout=10
        )
    assert as_dict(by_hand.result)["reversal_id"] == first["reversal_id"]

    found = await effects(js, topology(mesh), wf)
    assert len(by_tool(found, REFUND)) == 1
    (reversal,) = by_tool(found, REVERSE)
    assert reversal["effect"]["refund_effect_id"] == effect_id(wf, REFUND, refund_key)
