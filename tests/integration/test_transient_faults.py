"""Transient faults delay workflows and never fail them (RELIABILITY.md, "Transient faults
are not failures"): an agent passing its dependency's UNAVAILABLE back, a capability with
no live replica, a gate decision whose step could not be queued."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import nats.errors
import pytest

from tessera.agent import Agent, TaskContext, TaskResult
from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import Unavailable, error_details
from tessera.v1 import coordinator_pb2, planner_pb2
from tests.integration.harness import WS, Mesh, task, task_graph

# More than the task's 2 attempts can absorb, even with gRPC's own transparent retries
# (at most 5 calls per attempt): each attempt used to be spent by them.
FAULTS = 12
CALLS: Counter[str] = Counter()

flaky = Agent("flaky", version="1.0.0")


@flaky.capability("tf.flaky", version="1.0.0", side_effect="external_action", timeout_s=10)
async def flaky_step(ctx: TaskContext) -> TaskResult:
    """Fails like an agent whose tool proxy is restarting, then works."""
    CALLS[ctx.workflow_id] += 1
    if CALLS[ctx.workflow_id] <= FAULTS:
        raise Unavailable("tool proxy: failed to connect to all addresses; connection refused")
    return TaskResult(output={"calls": CALLS[ctx.workflow_id]})


def late_agent() -> Agent:
    """A fresh replica of the `late` agent (an Agent object starts once)."""
    agent = Agent("late", version="1.0.0")

    @agent.capability("tf.late", version="1.0.0", side_effect="read_only", timeout_s=10)
    async def late(ctx: TaskContext) -> TaskResult:
        return TaskResult(output={"ran": True})

    return agent


GATED = task_graph(
    "gated",
    planner_pb2.TaskSpec(
        id="approve", kind=planner_pb2.TASK_KIND_APPROVAL_GATE, gate_reason="go ahead?"
    ),
    task("work", "tf.late", "approve"),
)


@pytest.fixture
async def mesh(nats_url: str) -> AsyncIterator[Mesh]:
    CALLS.clear()
    async with Mesh(
        nats_url,
        "tf" + uuid.uuid4().hex[:6],
        agents=[flaky],
        retry_base_s=0.02,
        transient_retry_max_s=0.2,
    ) as running:
        yield running


async def _start(mesh: Mesh, plan: planner_pb2.TaskGraph) -> str:
    response = await mesh.stub.StartWorkflow(
        coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=plan)
    )
    return response.workflow.name


async def test_unavailability_passed_back_by_an_agent_does_not_spend_attempts(
    mesh: Mesh,
) -> None:
    name = await _start(mesh, task_graph("flaky", task("only", "tf.flaky", max_attempts=2)))
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error
    assert CALLS[name.split("/")[1]] == FAULTS + 1
    failures = [e.task_failed for e in await mesh.events(name) if e.HasField("task_failed")]
    assert len(failures) >= 3, "more failed attempts than max_attempts, all retried"
    assert all(f.transient and f.will_retry for f in failures)
    assert all(f.error.message.startswith("tool proxy") for f in failures)


async def test_a_capability_with_no_live_replica_waits_for_one(mesh: Mesh) -> None:
    first = late_agent()
    await first.start(settings=ServiceSettings(**mesh.common()))
    name = await _start(mesh, GATED)
    parked = await mesh.parked(name)
    (gate,) = parked.gates
    await first.stop()  # deregisters: no replica offers tf.late any more

    await mesh.decide(gate.name, approve=True)

    def waiting(workflow: coordinator_pb2.Workflow) -> bool:
        work = next(t for t in workflow.tasks if t.task_id == "work")
        return work.waiting_reason == "NO_AGENT" or workflow.state != WS.WORKFLOW_STATE_RUNNING

    shown = await mesh.wait_for(name, waiting)
    assert shown.state == WS.WORKFLOW_STATE_RUNNING, "it waits; it does not fail"
    work = next(t for t in shown.tasks if t.task_id == "work")
    assert work.state == coordinator_pb2.TASK_STATE_PENDING and work.HasField("retry_time")

    second = late_agent()
    await second.start(settings=ServiceSettings(**mesh.common()))
    try:
        workflow = await mesh.finished(name)
    finally:
        await second.stop()
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error
    work = next(t for t in workflow.tasks if t.task_id == "work")
    assert work.attempts == 1 and work.waiting_reason == ""


class _FaultyQueue:
    """The coordinator's store, whose next `enqueue` fails as a publish to a work queue
    with no leader does (after its own bounded retries); then NATS is back."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.enqueue = store.enqueue
        self.faulty = True
        store.enqueue = self._leaderless

    async def _leaderless(self, *args: Any, **kwargs: Any) -> None:
        self.store.enqueue = self.enqueue
        self.faulty = False
        raise nats.errors.NoRespondersError


def _fail_next_enqueue(mesh: Mesh) -> _FaultyQueue:
    return _FaultyQueue(mesh.coordinators[0].runner.store)  # type: ignore[union-attr]


async def test_a_retried_gate_decision_queues_the_step_its_first_try_could_not(
    mesh: Mesh,
) -> None:
    """DecideGate stored the decision, then queueing "advance" failed (the work queue had
    no leader) and it answered UNAVAILABLE: the client's retry of the same decision
    (here gRPC's transparent retry) must queue it, not answer GATE_NOT_PENDING and leave
    the workflow waiting forever."""
    agent = late_agent()
    await agent.start(settings=ServiceSettings(**mesh.common()))
    try:
        name = await _start(mesh, GATED)
        (gate,) = (await mesh.parked(name)).gates
        store = _fail_next_enqueue(mesh)
        retried = await mesh.decide(gate.name, approve=True)
        assert not store.faulty, "the fault was injected"
        assert retried.state == coordinator_pb2.GATE_STATE_APPROVED
        workflow = await mesh.finished(name)
        assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED
        decided = [e for e in await mesh.events(name) if e.HasField("gate_decided")]
        assert len(decided) == 1, "the retry recorded no second decision"
    finally:
        await agent.stop()


async def test_a_retried_decision_by_someone_else_is_still_refused(mesh: Mesh) -> None:
    """The repair is for the same decision by the same person, nobody else."""
    agent = late_agent()
    await agent.start(settings=ServiceSettings(**mesh.common()))
    try:
        name = await _start(mesh, GATED)
        (gate,) = (await mesh.parked(name)).gates
        store = _fail_next_enqueue(mesh)
        await mesh.decide(gate.name, approve=True, by="alice")
        assert not store.faulty, "the fault was injected"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.decide(gate.name, approve=True, by="mallory")
        assert error_details(refused.value).reason == "GATE_NOT_PENDING"
        events = await mesh.events(name)
        assert [e.gate_decided.decided_by for e in events if e.HasField("gate_decided")] == [
            "alice"
        ]
    finally:
        await agent.stop()
