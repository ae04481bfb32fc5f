"""Rolling replacement of an agent's replicas under a steady stream of workflows.

Two replicas of an agent run as their own processes; the planner and the coordinator run
in-process (the harness). While a workflow is started every 50 ms, replica 1 is stopped
with SIGTERM (it deregisters, lets its running tasks finish and exits 0) and a new one
started, then the same for replica 2. Every workflow succeeds; every task attempt ran
once; the new replicas took over the work.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from tessera.v1 import coordinator_pb2
from tests.integration.agents.process import AgentProcess
from tests.integration.executions import Executions
from tests.integration.harness import WS, Mesh, as_dict, task, task_graph

MIN_WORKFLOWS = 30
INTERVAL_S = 0.05


PLAN = task_graph(
    "rolling",
    task("first", "rolling.step", timeout_s=10),
    task("second", "rolling.step", "first", timeout_s=10),
)


@pytest.fixture
async def mesh(nats_url: str) -> AsyncIterator[Mesh]:
    async with Mesh(nats_url, "roll" + uuid.uuid4().hex[:6]) as running:
        yield running


async def _producer(mesh: Mesh, names: list[str], stop: asyncio.Event) -> None:
    """Start a workflow every INTERVAL_S until told to stop (and at least MIN_WORKFLOWS)."""
    while not (stop.is_set() and len(names) >= MIN_WORKFLOWS):
        request = coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=PLAN)
        response = await mesh.stub.StartWorkflow(request, timeout=10)
        names.append(response.workflow.name)
        await asyncio.sleep(INTERVAL_S)  # pacing of the load, not synchronisation


async def _replace(
    old: AgentProcess, start_new: Callable[[], AgentProcess], nc: Client, seen: Executions
) -> AgentProcess:
    assert await old.terminate() == 0, old.log_path.read_text()[-2000:]
    new = start_new()
    await new.registered(nc)
    await seen.served_by(new.instance_id)
    return new


async def test_replicas_are_replaced_one_by_one_while_every_workflow_succeeds(
    mesh: Mesh, tmp_path: Path
) -> None:
    nc = await nats.connect(mesh.nats_url)
    seen = Executions()
    await seen.follow(nc, mesh.namespace)
    started: list[AgentProcess] = []

    def start_replica() -> AgentProcess:
        replica = AgentProcess(
            "steady",
            "steady",
            nats_url=mesh.nats_url,
            namespace=mesh.namespace,
            registry_address=mesh.registry_address,
            log_dir=tmp_path / "agents",
        )
        started.append(replica)
        return replica

    names: list[str] = []
    stop = asyncio.Event()
    producer: asyncio.Task[None] | None = None
    try:
        replicas = [start_replica(), start_replica()]
        for replica in replicas:
            await replica.registered(nc)
        async with asyncio.timeout(90):
            producer = asyncio.create_task(_producer(mesh, names, stop))
            for replica in replicas:
                await seen.served_by(replica.instance_id)  # both take work before we roll
            for index in range(len(replicas)):
                replicas[index] = await _replace(replicas[index], start_replica, nc, seen)
            stop.set()
            await producer
            workflows = await asyncio.gather(*(mesh.finished(n, timeout=60) for n in names))
    finally:
        stop.set()
        if producer is not None and not producer.done():
            producer.cancel()
        for replica in started:
            replica.kill()
        await nc.close()

    assert len(names) >= MIN_WORKFLOWS
    states = Counter(WS.Name(w.state) for w in workflows)
    assert states == {"WORKFLOW_STATE_SUCCEEDED": len(names)}, states
    for workflow in workflows:
        assert as_dict(workflow.blackboard)["steps"] == ["first", "second"]
    # A stopping replica leaves the registry, then keeps serving longer than the
    # coordinator's registry snapshot may be stale: no attempt is sent to a closed port.
    failed = [
        event.task_failed
        for name in names
        for event in await mesh.events(name)
        if event.HasField("task_failed")
    ]
    assert not failed, failed
    # Four replicas served (two replaced, two new); no attempt was sent twice.
    assert len(seen.by_instance) == 4, seen.by_instance
    twice = {key: n for key, n in seen.dispatches.items() if n > 1}
    assert not twice, twice
    assert seen.failures == 0
