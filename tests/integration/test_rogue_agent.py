"""The rogue-agent attack of issue 11, on a governed mesh where every hop is mTLS.

A process on the same network writes a registry entry for ``billing`` (a copy of the real
replica's descriptor with its own endpoint) and deletes the real replica's entry. Three
impostors listen at that endpoint in turn: one with no certificate at all, one with a
certificate of the mesh CA for another agent (triage), and that same agent registering
itself under the name ``billing``. None of them receives a single ExecuteTask (so no task
token reaches them); every workflow still succeeds on the real billing replica.

The forged entry is written straight to NATS here (this harness's NATS runs without
permissions) to show that even a successful write pays nothing. On a deployed mesh the write
itself is refused: agents hold no NATS user, only the registry service writes the bucket
(tests/integration/test_nats_permissions.py), and the registry service registers an agent
only under its certificate's name (the tests at the end of this file).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from nats.js import JetStreamContext

from tessera.audit.reader import tail
from tessera.registry import Registry, registry_key
from tessera.runtime.bus import Topology, connect
from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import error_details
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.v1 import agent_pb2, agent_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import OpenBao
from tests.integration.harness import REFERENCE_AGENTS, WS, Mesh, reference_agent

pytestmark = pytest.mark.integration

WORKFLOWS = 3


class CountingAgent(agent_pb2_grpc.AgentServiceServicer):
    """An impostor's AgentService: counts what reaches it, answers nothing useful."""

    def __init__(self) -> None:
        self.calls = 0
        self.tokens: list[str] = []

    async def ExecuteTask(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.tokens.append(request.task_token)
        return agent_pb2.ExecuteTaskResponse()


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    agents = [reference_agent(name) for name in REFERENCE_AGENTS]
    async with Mesh(nats_url, "rogue" + uuid.uuid4().hex[:6], agents=agents, vault=openbao) as m:
        yield m


async def _impostor(mesh: Mesh, kind: str) -> tuple[GrpcServer, CountingAgent, Workload | None]:
    servicer = CountingAgent()
    workload = None
    if kind == "no certificate":
        settings = ServiceSettings(listen="127.0.0.1:0", insecure_plaintext=True)
    else:  # a real mesh certificate, but triage's
        settings = ServiceSettings(listen="127.0.0.1:0", **mesh.identity("agent-triage"))
        workload = await Workload.start(settings)
    server = GrpcServer(
        name="impostor",
        settings=settings,
        register=[lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, s)],
        service_names=["tessera.v1.AgentService"],
        identity=workload.certificate if workload else None,
    )
    await server.start()
    return server, servicer, workload


async def _real_billing(registry: Registry) -> list[agent_pb2.AgentDescriptor]:
    """The real replica's entry (an earlier attack deleted it until its next heartbeat)."""
    async with asyncio.timeout(registry.ttl_s * 2):
        while True:
            real = [d for d in await registry.agents() if d.name == "billing"]
            real = [d for d in real if d.instance_id != "rogue"]
            if real:
                return real
            await asyncio.sleep(0.2)  # polling the registry until the heartbeat lands


async def _hijack(mesh: Mesh, endpoint: str) -> Callable[[], asyncio.Future[None]]:
    """Write a forged billing entry pointing at ``endpoint`` and delete the real one (it
    comes back at its next heartbeat), then keep the forged entry alive with heartbeats
    of its own until the returned stop is called: dispatch keeps picking it."""
    nc = await connect(mesh.nats_url, name="rogue")
    registry = Registry(nc.jetstream(), Topology(mesh.namespace))
    kv = await nc.jetstream().key_value(Topology(mesh.namespace).registry_bucket)
    real = await _real_billing(registry)
    forged = agent_pb2.AgentDescriptor()
    forged.CopyFrom(real[0])
    forged.instance_id, forged.endpoint = "rogue", endpoint
    stop = asyncio.Event()

    await registry.register(forged)
    for replica in real:
        await kv.delete(registry_key(replica.name, replica.instance_id))

    async def keep_forging() -> None:
        while not stop.is_set():
            await registry.register(forged)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    task = asyncio.create_task(keep_forging())

    async def end() -> None:
        stop.set()
        await task
        await registry.deregister(forged)
        await nc.close()

    return lambda: asyncio.ensure_future(end())


@pytest.mark.parametrize("kind", ["no certificate", "another agent's certificate"])
async def test_a_forged_billing_entry_gets_no_task_and_workflows_succeed(
    mesh: Mesh, kind: str
) -> None:
    server, impostor, workload = await _impostor(mesh, kind)
    stop = await _hijack(mesh, server.address)
    try:
        names = [
            await mesh.start(
                "support",
                ticket={
                    "id": f"T-{uuid.uuid4().hex[:6]}",
                    "customer_id": "C-7",
                    "text": "Please refund the double charge",
                },
            )
            for _ in range(WORKFLOWS)
        ]
        finished = [await mesh.finished(name, timeout=90) for name in names]
    finally:
        await stop()
        await server.stop(0)
        if workload is not None:
            await workload.close()
    assert [w.state for w in finished] == [WS.WORKFLOW_STATE_SUCCEEDED] * WORKFLOWS
    assert impostor.calls == 0 and impostor.tokens == []


async def _register_as(
    mesh: Mesh, identity: str | None, descriptor: agent_pb2.AgentDescriptor
) -> grpc.aio.AioRpcError:
    """Register ``descriptor`` presenting ``identity``'s certificate (None: none at all);
    the refusal it gets."""
    if identity is None:
        ch = grpc.aio.insecure_channel(mesh.registry_address)
    else:
        ch = await mesh.channel_as(identity, mesh.registry_address, peer="registry")
    async with ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Register(registry_pb2.RegisterRequest(agent=descriptor), timeout=10)
    return refused.value


@pytest.fixture
async def js(mesh: Mesh) -> AsyncIterator[JetStreamContext]:
    nc = await connect(mesh.nats_url, name="test-rogue")
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _rejections(js: JetStreamContext, mesh: Mesh) -> list[dict[str, str]]:
    found = []
    async for entry in tail(js, Topology(mesh.namespace), n=100_000):
        record = entry.record
        if record is not None and record.actor == "registry" and record.outcome == "refused":
            found.append({k: str(v) for k, v in record.details.items()})
    return found


async def test_the_registry_service_registers_an_agent_only_under_its_own_name(
    mesh: Mesh, js: JetStreamContext
) -> None:
    registry = Registry(js, Topology(mesh.namespace))
    real = await _real_billing(registry)
    forged = agent_pb2.AgentDescriptor()
    forged.CopyFrom(real[0])
    forged.instance_id, forged.endpoint = "rogue", "127.0.0.1:1"
    before = {(d.name, d.instance_id, d.endpoint) for d in await registry.agents()}

    # Triage's real certificate, registering as billing: refused by the registry.
    as_triage = await _register_as(mesh, "agent-triage", forged)
    assert as_triage.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(as_triage).reason == "NAME_NOT_CALLERS"
    # A service identity: no agent, refused by the caller table.
    as_planner = await _register_as(mesh, "planner", forged)
    assert as_planner.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(as_planner).reason == "CALLER_NOT_ALLOWED"
    # No certificate: the handshake fails, nothing reaches the service.
    anonymous = await _register_as(mesh, None, forged)
    assert anonymous.code() == grpc.StatusCode.UNAVAILABLE

    after = {(d.name, d.instance_id, d.endpoint) for d in await registry.agents()}
    assert after == before and ("billing", "rogue", "127.0.0.1:1") not in after
    reasons = {r.get("reason") for r in await _rejections(js, mesh)}
    assert {"NAME_NOT_CALLERS", "CALLER_NOT_ALLOWED"} <= reasons, reasons

    name = await mesh.start(
        "support",
        ticket={"id": "T-reg", "customer_id": "C-7", "text": "Please refund the double charge"},
    )
    assert (await mesh.finished(name, timeout=90)).state == WS.WORKFLOW_STATE_SUCCEEDED


async def test_an_agent_deregisters_only_its_own_replicas_and_a_refusal_is_audited(
    mesh: Mesh, js: JetStreamContext
) -> None:
    registry = Registry(js, Topology(mesh.namespace))
    (billing, *_) = await _real_billing(registry)
    async with await mesh.channel_as("agent-triage", mesh.registry_address, peer="registry") as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Deregister(
                registry_pb2.DeregisterRequest(name="billing", instance_id=billing.instance_id),
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(refused.value).reason == "NAME_NOT_CALLERS"
    assert billing.instance_id in {d.instance_id for d in await _real_billing(registry)}
    assert any(
        r.get("reason") == "NAME_NOT_CALLERS"
        and r.get("caller") == "triage"
        and "deregister" in r.get("message", "")
        for r in await _rejections(js, mesh)
    )


async def test_a_malformed_descriptor_is_refused_with_its_field_violations(
    mesh: Mesh, js: JetStreamContext
) -> None:
    bad = agent_pb2.AgentDescriptor(name="triage", instance_id="bad id!", endpoint="nowhere")
    bad.capabilities.add(name="Support Triage", version="one")
    refused = await _register_as(mesh, "agent-triage", bad)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f for f, _ in error_details(refused).field_violations}
    assert fields == {
        "agent.instance_id",
        "agent.endpoint",
        "agent.capabilities[0].name",
        "agent.capabilities[0].version",
    }, fields
    registry = Registry(js, Topology(mesh.namespace))
    assert "bad id!" not in {d.instance_id for d in await registry.agents()}
