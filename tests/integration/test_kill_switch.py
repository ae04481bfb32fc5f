"""The kill switches, end to end on a task in the middle of a tool-calling loop:
cancelling its workflow, or freezing its agent, refuses the task's next tool call within
1 s (issue: "Kill switch and freeze, end to end"); a cancelled workflow ends CANCELLED.

A governed mesh (mTLS on every hop) on the real NATS and OpenBao, with one test agent
that calls a read-only tool every 0.2 s until a call is refused. The cancel comes as a
person's request arrives from the front door (the gateway's certificate and the claims
header), the freeze as the operator's (`tessera agents freeze`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from tessera.agent import Agent, TaskContext, TaskResult
from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import OpenBao
from tests.integration.harness import WS, Mesh, task, task_graph

pytestmark = pytest.mark.integration

REFUSED_WITHIN_S = 1.0
INTERVAL_S = 0.2
"""The agent's pause between tool calls."""


class Calls:
    """What the looping agent saw, as the test awaits it."""

    def __init__(self) -> None:
        self.ok = 0
        self.refused_at = 0.0
        self.refusal: grpc.StatusCode | None = None
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()

    def reset(self) -> None:
        self.ok, self.refused_at, self.refusal = 0, 0.0, None
        self.started, self.stopped = asyncio.Event(), asyncio.Event()


calls = Calls()
agent = Agent("looper", version="1.0.0")


@agent.capability(
    "test.loop",
    version="1.0.0",
    side_effect="read_only",
    reads=[],
    writes=["loops"],
    tools=["billing.get_invoices"],
    timeout_s=60,
)
async def loop(ctx: TaskContext) -> TaskResult:
    """Read invoices every INTERVAL_S until a call is refused (then fail)."""
    while True:
        try:
            await ctx.call_tool("billing.get_invoices", {"customer_id": "C-7", "limit": 1})
        except grpc.aio.AioRpcError as err:
            calls.refused_at, calls.refusal = time.monotonic(), err.code()
            calls.stopped.set()
            raise
        calls.ok += 1
        if calls.ok >= 2:
            calls.started.set()
        await asyncio.sleep(INTERVAL_S)


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    async with Mesh(nats_url, "killswitch", agents=[agent], vault=openbao) as running:
        yield running


def looping_plan() -> coordinator_pb2.StartWorkflowRequest:
    step = task("loop", "test.loop", max_attempts=1, timeout_s=60)
    step.tools.append("billing.get_invoices")  # the plan grants the tool the contract asks
    graph = task_graph("loop", step)
    graph.budget.max_tool_calls = 1000  # the loop, not its budget, is what ends it
    return coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=graph)


async def start_looping(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> str:
    calls.reset()
    started = await stub.StartWorkflow(looping_plan())
    await asyncio.wait_for(calls.started.wait(), timeout=30)
    return str(started.workflow.name)


async def test_cancel_refuses_the_running_tasks_next_tool_call_within_a_second(
    mesh: Mesh,
) -> None:
    # An on-call operator (a person) starts the plan and pulls the switch on it.
    olga = await mesh.as_person("olga", ["operators"])
    name = await start_looping(olga)

    await olga.CancelWorkflow(coordinator_pb2.CancelWorkflowRequest(name=name, reason="stop"))
    cancelled_at = time.monotonic()
    await asyncio.wait_for(calls.stopped.wait(), timeout=10)

    assert calls.refused_at - cancelled_at <= REFUSED_WITHIN_S, calls.refused_at - cancelled_at
    # The revoked task token: the proxy no longer accepts it.
    assert calls.refusal in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert (await mesh.finished(name)).state == WS.WORKFLOW_STATE_CANCELLED


async def test_freezing_the_agent_refuses_its_running_tasks_next_tool_call_within_a_second(
    mesh: Mesh,
) -> None:
    name = await start_looping(mesh.stub)
    channel = await mesh.channel_as("operator", mesh.registry_address, peer="registry")
    operator = registry_pb2_grpc.RegistryServiceStub(channel)
    try:
        await operator.FreezeAgent(registry_pb2.FreezeAgentRequest(name="looper", reason="test"))
        frozen_at = time.monotonic()
        await asyncio.wait_for(calls.stopped.wait(), timeout=10)
        assert calls.refused_at - frozen_at <= REFUSED_WITHIN_S, calls.refused_at - frozen_at
        assert calls.refusal in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )
    finally:
        await operator.UnfreezeAgent(registry_pb2.UnfreezeAgentRequest(name="looper"))
    # Its one attempt failed on the refusal (no other agent offers test.loop).
    assert (await mesh.finished(name)).state == WS.WORKFLOW_STATE_FAILED
