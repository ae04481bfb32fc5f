"""Fast, robust restarts: a killed agent comes back and works; a forming cluster is waited out.

1. An agent runs as its own process (``python -m tests.integration.agents.steady``) beside
   an in-process planner and coordinator. It is killed with SIGKILL, started again with
   the same command (same port), and is SERVING again, registered under a new instance
   id, and the next workflow's task is executed by it.
2. Agents started while a 3-node JetStream cluster elects a new leader for the registry
   bucket (its leader's node was just killed) all start, serve and register: their first
   NATS calls wait the election out instead of failing the start.

No timing is asserted (tests/bench/bench_startup.py measures how fast).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from services.registry.app import RegistryApp
from services.registry.settings import RegistrySettings
from tessera.agent import AGENT_SERVICE_NAME, Agent, AgentSettings, TaskContext, TaskResult
from tessera.launcher import cluster
from tessera.launcher.ports import free_port
from tessera.registry import Registry
from tessera.runtime.bus import Topology, connect
from tessera.runtime.grpc_client import wait_for_serving
from tessera.v1 import coordinator_pb2
from tests.integration.agents.process import AgentProcess
from tests.integration.executions import Executions
from tests.integration.harness import WS, Mesh, task, task_graph

PLAN = task_graph("restart", task("only", "rolling.step", timeout_s=10))


@pytest.fixture
async def mesh(nats_url: str) -> AsyncIterator[Mesh]:
    async with Mesh(nats_url, "rs" + uuid.uuid4().hex[:6]) as running:
        yield running


async def _run_workflow(mesh: Mesh) -> coordinator_pb2.Workflow:
    request = coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=PLAN)
    response = await mesh.stub.StartWorkflow(request, timeout=10)
    return await mesh.finished(response.workflow.name, timeout=60)


async def test_a_killed_agent_restarted_with_the_same_command_serves_and_takes_a_task(
    mesh: Mesh, tmp_path: Path
) -> None:
    nc = await nats.connect(mesh.nats_url)
    seen = Executions()
    await seen.follow(nc, mesh.namespace)
    port = free_port()

    def start() -> AgentProcess:
        return AgentProcess(
            "steady",
            "steady",
            nats_url=mesh.nats_url,
            namespace=mesh.namespace,
            registry_address=mesh.registry_address,
            log_dir=tmp_path / "agents",
            port=port,
        )

    first = start()
    second: AgentProcess | None = None
    try:
        await first.registered(nc)
        assert (await _run_workflow(mesh)).state == WS.WORKFLOW_STATE_SUCCEEDED

        first.kill()  # SIGKILL: no deregistration, its registry entry stays until the TTL
        second = start()
        assert second.proc.args == first.proc.args
        await wait_for_serving(second.endpoint, AGENT_SERVICE_NAME, timeout=30)
        await second.registered(nc, replacing=first.instance_id)
        assert second.instance_id != first.instance_id

        workflow = await _run_workflow(mesh)
        await nc.flush()
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await nc.close()

    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, WS.Name(workflow.state)
    assert seen.by_instance[second.instance_id] >= 1, seen.by_instance


def _agent(name: str) -> Agent:
    agent = Agent(name, version="1.0.0")

    @agent.capability(f"{name}.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        """Answer with the input."""
        return TaskResult(output=ctx.input)

    return agent


async def test_agents_started_while_a_cluster_elects_leaders_all_serve_and_register(
    nats_cluster: cluster.NatsCluster,
) -> None:
    """The registry bucket and the events stream exist with 3 replicas, and the node
    leading the registry has just been killed: its stream is electing a new leader when
    the registry service and the agents start. The agents' registrations wait out the
    registry service (not serving yet) and its writes (no leader yet): all register."""
    topology = Topology("el" + uuid.uuid4().hex[:6])
    agents = [_agent(f"elect{i}") for i in range(6)]
    registry_port = free_port()
    registry = RegistryApp(
        RegistrySettings(
            nats_url=nats_cluster.url,
            namespace=topology.namespace,
            jetstream_replicas=nats_cluster.replicas,
            listen=f"127.0.0.1:{registry_port}",
        )
    )
    settings = [
        AgentSettings.for_agent(
            agent.name,
            nats_url=nats_cluster.url,
            namespace=topology.namespace,
            jetstream_replicas=nats_cluster.replicas,
            registry_address=f"127.0.0.1:{registry_port}",
            listen="127.0.0.1:0",
        )
        for agent in agents
    ]
    nc = await connect(nats_cluster.url, name="test-startup")
    try:
        js = nc.jetstream()
        await js.create_key_value(
            bucket=topology.registry_bucket,
            ttl=topology.registry_ttl_s,
            replicas=nats_cluster.replicas,
        )
        await js.add_stream(
            name=topology.events_stream,
            subjects=[topology.events_subjects],
            num_replicas=nats_cluster.replicas,
        )
        info = await js.stream_info(f"KV_{topology.registry_bucket}")
        assert info.cluster is not None and info.cluster.leader
        os.kill(nats_cluster.node(info.cluster.leader).pid, signal.SIGKILL)
        try:
            started = await asyncio.gather(
                registry.start(),
                *(agent.start(settings=s) for agent, s in zip(agents, settings, strict=True)),
            )
            endpoints = started[1:]
            for endpoint in endpoints:
                await wait_for_serving(endpoint, AGENT_SERVICE_NAME, timeout=30)
            registered = {d.name for d in await Registry(js, topology).agents()}
        finally:
            await asyncio.gather(*(agent.stop(grace_s=0) for agent in agents))
            await registry.stop()
    finally:
        await nc.close()

    assert registered == {agent.name for agent in agents}
