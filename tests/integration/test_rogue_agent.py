"""The rogue-agent attack of issue 11, on a governed mesh where every hop is mTLS.

A process on the same network writes a registry entry for ``billing`` (a copy of the real
replica's descriptor with its own endpoint) and deletes the real replica's entry. Three
impostors listen at that endpoint in turn: one with no certificate at all, one with a
certificate of the mesh CA for another agent (triage), and that same agent registering
itself under the name ``billing``. None of them receives a single ExecuteTask (so no task
token reaches them); every workflow still succeeds on the real billing replica.

What this does not cover yet: NATS itself still lets the rogue write and delete registry
entries (the NATS permissions and the RegistryService of issue 11 are next); here the
payoff of that write is what is taken away.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tessera.registry import Registry, registry_key
from tessera.runtime.bus import Topology, connect
from tessera.runtime.config import ServiceSettings
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.v1 import agent_pb2, agent_pb2_grpc
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
