"""Durability: a coordinator killed with SIGKILL mid-workflow and mid-fan-out is replaced
and every workflow completes with each agent side effect performed exactly once; two
replicas working the same workflows never both advance one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tessera.agent import Agent, TaskContext, TaskResult
from tessera.launcher.ports import free_port
from tessera.runtime.grpc_client import wait_for_serving
from tessera.v1 import coordinator_pb2, planner_pb2
from tests.integration.harness import TERMINAL, WS, Mesh, task, task_graph

REDELIVERED = "tessera_work_steps_redelivered_total"  # the coordinators' Prometheus counter
EXECUTIONS: Counter[tuple[str, str]] = Counter()
ARRIVED: Counter[str] = Counter()
RELEASE = asyncio.Event()
ARRIVAL = asyncio.Event()

agent = Agent("durability", version="1.0.0")


def _count(ctx: TaskContext) -> None:
    EXECUTIONS[(ctx.workflow_id, ctx.task_id)] += 1


@agent.capability(
    "dur.step",
    version="1.0.0",
    side_effect="external_action",
    writes=["steps"],
    reads=["steps"],
    timeout_s=20,
)
async def step(ctx: TaskContext) -> TaskResult:
    _count(ctx)
    return TaskResult(
        output={"task": ctx.task_id}, writes={"steps": (ctx.blackboard.get("steps") or 0) + 1}
    )


@agent.capability("dur.held", version="1.0.0", side_effect="external_action", timeout_s=20)
async def held(ctx: TaskContext) -> TaskResult:
    """Runs once, then waits until the test releases it (the coordinator dies meanwhile)."""
    _count(ctx)
    ARRIVED[ctx.workflow_id] += 1
    ARRIVAL.set()
    await RELEASE.wait()
    return TaskResult(output={"task": ctx.task_id})


PIPELINE = task_graph(
    "pipeline",
    task("first", "dur.step"),
    task("middle", "dur.held", "first"),
    task("last", "dur.step", "middle"),
)
FAN_OUT = task_graph(
    "fan-out",
    task("a", "dur.step"),
    task("b", "dur.held"),
    task("c", "dur.step"),
    task("join", "dur.step", "a", "b", "c"),
)


class CoordinatorProcess:
    """`python -m services.coordinator` as a real process, killable with SIGKILL."""

    def __init__(self, mesh: Mesh, log_dir: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "TESSERA_NATS_URL": mesh.nats_url,
            "TESSERA_NAMESPACE": mesh.namespace,
            "TESSERA_COORDINATOR_LISTEN": f"127.0.0.1:{self.port}",
            "TESSERA_PLANNER_ADDRESS": mesh.planner_address,
        }
        env.pop("TESSERA_COORDINATOR_ACK_WAIT_S", None)  # the default ack wait, as shipped
        log = (log_dir / f"coordinator-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.coordinator"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self) -> None:
        await wait_for_serving(
            f"127.0.0.1:{self.port}", "tessera.v1.CoordinatorService", timeout=30
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


@pytest.fixture
async def mesh(nats_url: str) -> AsyncIterator[Mesh]:
    EXECUTIONS.clear()
    ARRIVED.clear()
    RELEASE.clear()
    async with Mesh(
        nats_url, "dur" + uuid.uuid4().hex[:6], agents=[agent], coordinators=0
    ) as running:
        yield running


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[CoordinatorProcess]]:
    started: list[CoordinatorProcess] = []
    yield started
    for process in started:
        process.stop()


async def _start_all(mesh: Mesh, plan: planner_pb2.TaskGraph, n: int) -> list[str]:
    names = []
    for _ in range(n):
        response = await mesh.stub.StartWorkflow(
            coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=plan)
        )
        names.append(response.workflow.name)
    return names


async def _until_arrived(ids: list[str]) -> None:
    """Wait (event-driven) until every workflow's held task has started."""
    async with asyncio.timeout(30):
        while True:
            ARRIVAL.clear()
            if all(ARRIVED[i] == 1 for i in ids):
                return
            await ARRIVAL.wait()


@pytest.mark.parametrize("plan", [PIPELINE, FAN_OUT], ids=["mid-workflow", "mid-fan-out"])
async def test_killed_coordinator_is_replaced_and_effects_happen_once(
    mesh: Mesh,
    processes: list[CoordinatorProcess],
    tmp_path: Path,
    plan: planner_pb2.TaskGraph,
) -> None:
    first = CoordinatorProcess(mesh, tmp_path)
    processes.append(first)
    await first.ready()
    await mesh.use_coordinator(f"127.0.0.1:{first.port}")
    names = await _start_all(mesh, plan, 3)
    ids = [n.split("/")[1] for n in names]
    await _until_arrived(ids)

    first.kill()  # the held tasks are in flight; the coordinator never hears back
    RELEASE.set()
    second = CoordinatorProcess(mesh, tmp_path)
    processes.append(second)
    await second.ready()
    await mesh.use_coordinator(f"127.0.0.1:{second.port}")

    for name in names:
        workflow = await mesh.finished(name, timeout=60)
        assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED
    expected = {(i, t.id) for i in ids for t in plan.tasks}
    assert set(EXECUTIONS) == expected
    assert all(count == 1 for count in EXECUTIONS.values()), EXECUTIONS


async def test_a_step_running_for_many_ack_waits_stays_with_its_live_replica(
    mesh: Mesh,
) -> None:
    """The replica running a step extends its ack deadline while the step lasts, so a
    second replica polling the same queue never receives it, however short the ack wait."""
    for _ in range(2):
        await mesh.add_coordinator()
    await mesh.use_coordinator(mesh.coordinators[0].address)
    ack_wait = mesh.coordinators[0].settings.ack_wait_s
    before = REGISTRY.get_sample_value(REDELIVERED) or 0.0
    (name,) = await _start_all(mesh, PIPELINE, 1)
    await _until_arrived([name.split("/")[1]])
    # The scenario itself is a duration: the held task stays in flight for 5 ack waits.
    await asyncio.sleep(5 * ack_wait)
    RELEASE.set()
    workflow = await mesh.finished(name, timeout=30)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED
    assert (REGISTRY.get_sample_value(REDELIVERED) or 0.0) == before
    assert all(count == 1 for count in EXECUTIONS.values()), EXECUTIONS


async def test_two_replicas_never_both_advance_a_workflow(mesh: Mesh) -> None:
    RELEASE.set()
    for _ in range(2):
        await mesh.add_coordinator()
    await mesh.use_coordinator(mesh.coordinators[0].address)
    names = await _start_all(mesh, PIPELINE, 12)
    store = mesh.coordinators[0].runner.store  # type: ignore[union-attr]
    for name in names:  # extra steps make both replicas work the same workflow at once
        for _ in range(3):
            await store.enqueue(name.split("/")[1], "contention")
    for name in names:
        workflow = await mesh.finished(name, timeout=60)
        assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED
        events = await mesh.events(name)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        transitions = [
            (e.WhichOneof("kind"), e.task_dispatched.task_id, e.task_succeeded.task_id)
            for e in events
        ]
        assert len(transitions) == len(set(transitions)), transitions
        assert workflow.state in TERMINAL
    assert all(count == 1 for count in EXECUTIONS.values()), EXECUTIONS
    assert len(EXECUTIONS) == 3 * len(names)
