"""The kill switch for one agent: an operator freezes `billing`, and at once its replicas
leave the registry, its registrations are refused, its tool calls are refused by policy,
and the freeze is on the audit trail in the operator's name; unfrozen, it comes back at
its next heartbeat. Only an operator may freeze.

A governed mesh (mTLS on every hop, the reference agents) on the real NATS and OpenBao;
the test acts as the operator, as `tessera agents freeze` does."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import grpc
import pytest

from tessera.audit import tail
from tessera.registry import Registry
from tessera.runtime.bus import Topology, connect
from tessera.runtime.errors import error_details
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import (
    agent_pb2,
    audit_pb2,
    registry_pb2,
    registry_pb2_grpc,
    tool_proxy_pb2,
    tool_proxy_pb2_grpc,
)
from tessera.vault import VaultClient
from tests.conftest import OpenBao
from tests.integration.harness import REFERENCE_AGENTS, Mesh, reference_agent
from tests.integration.test_governed_calls import eventually

pytestmark = pytest.mark.integration

FROZEN_WITHIN_S = 1.0
"""How soon a freeze must stop the agent's tool calls (issue: "within 1 s")."""


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    agents = [reference_agent(name) for name in REFERENCE_AGENTS]
    async with Mesh(nats_url, "freeze", agents=agents, vault=openbao) as running:
        yield running


async def registry_as(mesh: Mesh, identity: str) -> registry_pb2_grpc.RegistryServiceStub:
    channel = await mesh.channel_as(identity, mesh.registry_address, peer="registry")
    return registry_pb2_grpc.RegistryServiceStub(channel)


async def billing_token(mesh: Mesh) -> tuple[str, str, str]:
    """A live task token for billing (as the coordinator issues one): token, wf, task."""
    assert mesh.vault is not None
    wf, task = "wf-" + secrets.token_hex(6), "task-" + secrets.token_hex(4)
    vault = await VaultClient.from_approle_file(mesh.vault.addr, mesh.approles["coordinator"])
    try:
        token = await vault.create_task_token(
            tools=["billing.get_invoices"],
            ttl_s=120,
            num_uses=20,
            meta={"workflow": wf, "task": task, "agent": "billing"},
        )
    finally:
        await vault.close()
    return token.token, wf, task


async def get_invoices(mesh: Mesh, token: str, wf: str, task: str) -> None:
    channel = await mesh.channel_as("agent-billing", mesh.tool_proxy_address, peer="tool-proxy")
    request = tool_proxy_pb2.InvokeToolRequest(tool="billing.get_invoices")
    request.context.workflow_id, request.context.task_id = wf, task
    request.arguments.update({"customer_id": "C-7"})
    stub = tool_proxy_pb2_grpc.ToolProxyServiceStub(channel)
    await stub.InvokeTool(request, metadata=((TASK_TOKEN_METADATA, token),), timeout=10)


async def billing_replicas(mesh: Mesh) -> list[agent_pb2.AgentDescriptor]:
    nc = await connect(mesh.nats_url, name="freeze-test")
    try:
        live = await Registry(nc.jetstream(), Topology(mesh.namespace)).agents()
    finally:
        await nc.close()
    return [a for a in live if a.name == "billing"]


async def freeze_records(mesh: Mesh) -> list[audit_pb2.AuditRecord]:
    nc = await connect(mesh.nats_url, name="freeze-test")
    try:
        return [
            e.record
            async for e in tail(nc.jetstream(), Topology(mesh.namespace), n=100_000)
            if e.record is not None and e.record.kind == audit_pb2.AUDIT_KIND_AGENT_FREEZE
        ]
    finally:
        await nc.close()


async def test_a_frozen_agent_leaves_the_registry_calls_no_tool_and_comes_back_unfrozen(
    mesh: Mesh,
) -> None:
    operator = await registry_as(mesh, "operator")
    token, wf, task = await billing_token(mesh)
    await get_invoices(mesh, token, wf, task)  # allowed before
    (billing,) = await billing_replicas(mesh)

    frozen = await operator.FreezeAgent(
        registry_pb2.FreezeAgentRequest(name="billing", reason="suspected prompt injection")
    )
    assert frozen.frozen.frozen_by == "service/operator"  # the principal, as workloads are named
    assert frozen.replicas_removed == 1
    assert await billing_replicas(mesh) == []

    async def refused() -> bool:
        try:
            await get_invoices(mesh, token, wf, task)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "frozen-agent" in error_details(err).metadata.get("policies", ""), err
            return True
        return False

    await eventually(refused, timeout_s=FROZEN_WITHIN_S)

    # Its heartbeat is refused, on the record, and it stays out of the registry.
    agent_stub = await registry_as(mesh, "agent-billing")
    with pytest.raises(grpc.aio.AioRpcError) as heartbeat:
        await agent_stub.Register(registry_pb2.RegisterRequest(agent=billing), timeout=10)
    assert heartbeat.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(heartbeat.value).reason == "AGENT_FROZEN"
    assert await billing_replicas(mesh) == []
    listed = await operator.ListFrozenAgents(registry_pb2.ListFrozenAgentsRequest())
    assert [(a.name, a.reason) for a in listed.agents] == [
        ("billing", "suspected prompt injection")
    ]

    unfrozen = await operator.UnfreezeAgent(registry_pb2.UnfreezeAgentRequest(name="billing"))
    assert unfrozen.was_frozen

    async def back() -> bool:
        return bool(await billing_replicas(mesh))

    # The replica's own heartbeat (every lease/3) brings it back.
    await eventually(back, timeout_s=mesh_lease_s(mesh))

    async def allowed() -> bool:
        try:
            await get_invoices(mesh, token, wf, task)
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(allowed, timeout_s=FROZEN_WITHIN_S)
    records = [(r.outcome, r.resource, r.details["principal"]) for r in await freeze_records(mesh)]
    operator_id = "service/operator"
    assert records[-2:] == [
        ("frozen", "registry/agent/billing", operator_id),
        ("unfrozen", "registry/agent/billing", operator_id),
    ]


def mesh_lease_s(mesh: Mesh) -> float:
    return Topology(mesh.namespace).registry_ttl_s


async def test_only_an_operator_freezes_an_agent(mesh: Mesh) -> None:
    # An agent (even the one named) cannot freeze or unfreeze anyone: the caller table
    # refuses it before the registry's code runs.
    rogue = await registry_as(mesh, "agent-billing")
    for call in (
        rogue.FreezeAgent(registry_pb2.FreezeAgentRequest(name="fraud")),
        rogue.UnfreezeAgent(registry_pb2.UnfreezeAgentRequest(name="billing")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(refused.value).reason == "CALLER_NOT_ALLOWED"
    operator = await registry_as(mesh, "operator")
    listed = await operator.ListFrozenAgents(registry_pb2.ListFrozenAgentsRequest())
    assert "fraud" not in {a.name for a in listed.agents}


async def test_a_freeze_names_a_real_agent_name(mesh: Mesh) -> None:
    operator = await registry_as(mesh, "operator")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await operator.FreezeAgent(registry_pb2.FreezeAgentRequest(name="billing.*"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(bad.value).field_violations[0][0] == "name"
