"""An attempt sent to two replicas of one agent moves money once (issue 11, part 4).

Agents keep no shared state (they hold no NATS credentials), so each replica only
remembers its own executions: the same attempt re-sent to another replica runs the
handler again. That must stay harmless. It does because every effect goes through the
tool proxy, whose idempotency key names the workflow, the tool and the agent's key, not
the replica: the second run's refund is answered from the first's record (or, while the
first is still in flight, refused as ABORTED for a later retry).

Here the coordinator's part is played by the test, with the coordinator's certificate and
a real task token, so the duplicate is certain rather than left to a race.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tessera.agent import Agent
from tessera.agent._convert import to_value
from tessera.runtime.bus import Topology, connect
from tessera.runtime.config import ServiceSettings
from tessera.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tessera.vault import VaultClient
from tests.conftest import OpenBao
from tests.end_of_run import read_effects
from tests.integration.harness import REPO, Mesh, reference_agent

pytestmark = pytest.mark.integration


def _second_billing_replica() -> Agent:
    """The reference billing agent's module loaded a second time: its own Agent object,
    as a second process would have."""
    path = REPO / "services" / "agents" / "billing" / "agent.py"
    spec = importlib.util.spec_from_file_location(f"billing_replica_{uuid.uuid4().hex}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.agent  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    agents = [reference_agent("billing")]
    async with Mesh(nats_url, "dup" + uuid.uuid4().hex[:6], agents=agents, vault=openbao) as m:
        yield m


async def _refunds(mesh: Mesh, wf: str) -> list[dict[str, Any]]:
    nc = await connect(mesh.nats_url, name="test-duplicates")
    try:
        effects = await read_effects(nc.jetstream(), Topology(mesh.namespace), {wf})
    finally:
        await nc.close()
    return [e for e in effects if e.get("tool") == "billing.issue_refund"]


async def test_an_attempt_sent_to_two_replicas_refunds_once(mesh: Mesh) -> None:
    twin = _second_billing_replica()
    await twin.start(settings=ServiceSettings(**mesh.common(), **mesh.identity("agent-billing")))
    first = reference_agent("billing")
    try:
        assert twin.instance_id != first.instance_id
        wf, task = "wf-" + secrets.token_hex(6), "task-" + secrets.token_hex(4)
        assert mesh.vault is not None
        vault = await VaultClient.from_approle_file(mesh.vault.addr, mesh.approles["coordinator"])
        try:
            token = await vault.create_task_token(
                tools=["billing.get_invoices", "billing.issue_refund"],
                ttl_s=120,
                num_uses=20,
                meta={"workflow": wf, "task": task, "agent": "billing"},
            )
        finally:
            await vault.close()
        request = agent_pb2.ExecuteTaskRequest(
            context=common_pb2.RequestContext(workflow_id=wf, task_id=task),
            capability="support.billing",
            attempt=1,
            task_token=token.token,
            tool_proxy_endpoint=mesh.tool_proxy_address,
        )
        ticket = {"id": "T-dup", "customer_id": "C-7", "text": "Please refund 40 EUR"}
        request.blackboard["ticket"].CopyFrom(to_value(ticket))

        async def execute_on(endpoint: str) -> agent_pb2.ExecuteTaskResponse:
            # As the coordinator: the only caller ExecuteTask admits.
            async with await mesh.channel_as("coordinator", endpoint, peer="agent-billing") as ch:
                stub = agent_pb2_grpc.AgentServiceStub(ch)
                return await stub.ExecuteTask(request, timeout=30)

        # At once: while one replica's refund is in flight, the other's same call is told
        # ABORTED (retry later), which the coordinator retries like any transient fault.
        endpoints = (first.endpoint, twin.endpoint)
        raced = await asyncio.gather(*(execute_on(e) for e in endpoints), return_exceptions=True)
        for outcome in raced:
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, grpc.aio.AioRpcError), outcome
                assert outcome.code() == grpc.StatusCode.ABORTED, outcome
        assert any(isinstance(o, agent_pb2.ExecuteTaskResponse) for o in raced), raced
        # Then again on each replica, as a re-sent attempt lands after a lost answer.
        answers = [await execute_on(e) for e in endpoints]
    finally:
        await twin.stop(grace_s=1)

    notes = {a.output.json["billing_notes"] for a in answers}
    notes |= {o.output.json["billing_notes"] for o in raced if not isinstance(o, BaseException)}
    assert len(notes) == 1 and "refunded 40.00" in next(iter(notes)), notes
    refunds = await _refunds(mesh, wf)
    assert len(refunds) == 1, refunds
