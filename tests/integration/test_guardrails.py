"""Guardrails and bad input through the real planner and coordinator on real NATS: each
stops or parks the workflow in a defined state, with the reason on record."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage
from tessera.runtime.errors import error_details
from tessera.v1 import coordinator_pb2, events_pb2, planner_pb2
from tests.integration.harness import WS, Mesh, as_dict, task, task_graph

agent = Agent("guardrails", version="1.0.0")
_counter = itertools.count()


@agent.capability("guard.spend", version="1.0.0", side_effect="read_only", timeout_s=5)
async def spend(ctx: TaskContext) -> TaskResult:
    return TaskResult(output={"spent": 600}, usage=Usage(tokens=600))


@agent.capability(
    "guard.ping",
    version="1.0.0",
    side_effect="read_only",
    writes=["n"],
    handoffs=["guard.pong"],
    timeout_s=5,
)
async def ping(ctx: TaskContext) -> TaskResult:
    # A new value every time: progress the loop guard rightly lets through.
    return TaskResult(writes={"n": next(_counter)}, handoff=Handoff("guard.pong"))


@agent.capability(
    "guard.pong",
    version="1.0.0",
    side_effect="read_only",
    writes=["n"],
    handoffs=["guard.ping"],
    timeout_s=5,
)
async def pong(ctx: TaskContext) -> TaskResult:
    return TaskResult(writes={"n": next(_counter)}, handoff=Handoff("guard.ping"))


@agent.capability(
    "guard.liar", version="1.0.0", side_effect="read_only", writes=["allowed"], timeout_s=5
)
async def liar(ctx: TaskContext) -> TaskResult:
    return TaskResult(writes={"not_declared": True})


@agent.capability(
    "guard.unsure",
    version="1.0.0",
    side_effect="read_only",
    writes=["guess"],
    confidence_threshold=0.8,
    timeout_s=5,
)
async def unsure(ctx: TaskContext) -> TaskResult:
    return TaskResult(output={"guess": 42}, writes={"guess": 42}, confidence=0.3)


@pytest.fixture(scope="module")
async def mesh(nats_url: str) -> AsyncIterator[Mesh]:
    async with Mesh(nats_url, "guard" + uuid.uuid4().hex[:6], agents=[agent]) as running:
        yield running


def plan(
    *capabilities: str, max_tokens: int = 10_000, max_iterations: int = 20, max_attempts: int = 1
) -> planner_pb2.TaskGraph:
    """A pipeline t0 → t1 → ... of `capabilities`."""
    tasks = [
        task(f"t{i}", c, *([f"t{i - 1}"] if i else []), max_attempts=max_attempts, timeout_s=5)
        for i, c in enumerate(capabilities)
    ]
    return task_graph("guardrails", *tasks, max_iterations=max_iterations, max_tokens=max_tokens)


async def start(mesh: Mesh, graph: planner_pb2.TaskGraph, request_id: str = "") -> str:
    response = await mesh.stub.StartWorkflow(
        coordinator_pb2.StartWorkflowRequest(request_id=request_id or uuid.uuid4().hex, plan=graph)
    )
    return response.workflow.name


async def trips(mesh: Mesh, name: str) -> list[int]:
    return [
        e.guardrail_tripped.guardrail
        for e in await mesh.events(name)
        if e.HasField("guardrail_tripped")
    ]


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def test_budget_exhausted_stops_the_workflow_early(mesh: Mesh) -> None:
    name = await start(mesh, plan("guard.spend", "guard.spend", "guard.spend", max_tokens=1000))
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_FAILED
    assert workflow.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert events_pb2.GUARDRAIL_BUDGET in await trips(mesh, name)
    ran = [t.task_id for t in workflow.tasks if t.state == coordinator_pb2.TASK_STATE_SUCCEEDED]
    assert ran == ["t0", "t1"]  # the third never started


async def test_iteration_cap_stops_endless_but_changing_handoffs(mesh: Mesh) -> None:
    name = await start(mesh, plan("guard.ping", max_iterations=5))
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_FAILED
    assert events_pb2.GUARDRAIL_ITERATION_CAP in await trips(mesh, name)
    assert events_pb2.GUARDRAIL_LOOP not in await trips(mesh, name)
    assert sum(t.attempts for t in workflow.tasks) == 5


async def test_output_breaking_the_contract_is_retried_then_fails_cleanly(mesh: Mesh) -> None:
    name = await start(mesh, plan("guard.liar", max_attempts=2))
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_FAILED
    assert (await trips(mesh, name)).count(events_pb2.GUARDRAIL_INVALID_OUTPUT) == 2
    (task,) = workflow.tasks
    assert task.attempts == 2 and "not declared" in task.error.message
    assert "not_declared" not in as_dict(workflow.blackboard)


async def test_low_confidence_opens_a_review_gate_holding_the_output(mesh: Mesh) -> None:
    name = await start(mesh, plan("guard.unsure"))
    workflow = await mesh.parked(name)
    (gate,) = workflow.gates
    assert gate.kind == events_pb2.GATE_KIND_LOW_CONFIDENCE
    assert "guess" not in as_dict(workflow.blackboard)
    await mesh.decide(gate.name, approve=True)
    workflow = await mesh.finished(name)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED
    assert as_dict(workflow.blackboard)["guess"] == 42
    # The same decision again is a retry, answered as the first; another is refused.
    approved = coordinator_pb2.GATE_STATE_APPROVED
    assert (await mesh.decide(gate.name, approve=True)).state == approved
    again = await refused(mesh.decide(gate.name, approve=False))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(again).reason == "GATE_NOT_PENDING"
    decided = [e for e in await mesh.events(name) if e.HasField("gate_decided")]
    assert len(decided) == 1


async def test_a_repeated_start_with_the_same_request_id_returns_the_same_workflow(
    mesh: Mesh,
) -> None:
    request_id = uuid.uuid4().hex
    first = await start(mesh, plan("guard.spend"), request_id)
    second = await start(mesh, plan("guard.spend"), request_id)
    assert first == second
    listed = await mesh.stub.ListWorkflows(coordinator_pb2.ListWorkflowsRequest(page_size=500))
    assert [w.name for w in listed.workflows].count(first) == 1


async def test_bad_requests_get_precise_statuses(mesh: Mesh) -> None:
    stub = mesh.stub
    no_id = await refused(stub.StartWorkflow(coordinator_pb2.StartWorkflowRequest(goal="risk")))
    assert no_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error_details(no_id).field_violations] == ["request_id"]

    unknown = await refused(
        stub.StartWorkflow(
            coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, goal="nosuchtemplate")
        )
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(unknown).reason == "TEMPLATE_NOT_FOUND"

    huge = struct_pb2.Struct()
    huge.update({"blob": "x" * 300_000})
    too_big = await refused(
        stub.StartWorkflow(
            coordinator_pb2.StartWorkflowRequest(
                request_id=uuid.uuid4().hex, goal="risk", inputs=huge
            )
        )
    )
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    missing = await refused(start(mesh, plan("guard.nobody_offers_this")))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any("t0" in d for _, d in error_details(missing).field_violations)

    malformed = await refused(
        stub.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name="workflows/../etc"))
    )
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    absent = await refused(
        stub.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name="workflows/doesnotexist"))
    )
    assert absent.code() == grpc.StatusCode.NOT_FOUND

    name = await start(mesh, plan("guard.spend"))
    await mesh.finished(name)
    no_gate = await refused(mesh.decide(f"{name}/gates/nope", approve=True))
    assert no_gate.code() == grpc.StatusCode.FAILED_PRECONDITION
    bad_token = await refused(
        stub.ListWorkflows(coordinator_pb2.ListWorkflowsRequest(page_token="not-a-token"))
    )
    assert bad_token.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_pages_through_workflows_by_state(mesh: Mesh) -> None:
    names = [await start(mesh, plan("guard.unsure")) for _ in range(3)]
    for name in names:
        await mesh.parked(name)
    seen: list[str] = []
    token = ""
    while True:
        page = await mesh.stub.ListWorkflows(
            coordinator_pb2.ListWorkflowsRequest(
                page_size=2, page_token=token, state=WS.WORKFLOW_STATE_WAITING_APPROVAL
            )
        )
        assert all(w.state == WS.WORKFLOW_STATE_WAITING_APPROVAL for w in page.workflows)
        seen += [w.name for w in page.workflows]
        token = page.next_page_token
        if not token:
            break
    assert set(names) <= set(seen)
    assert len(seen) == len(set(seen))


async def test_one_workflow_is_one_trace_across_coordinator_and_agents(mesh: Mesh) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    # The step span ends when the coordinator's step returns, just after the terminal state
    # it saved became visible to this test: wait for that span, not for the state.
    loop = asyncio.get_running_loop()
    step_ended = asyncio.Event()
    watched: list[str] = []

    class StepEnded(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            attrs = span.attributes or {}
            if span.name == "workflow.step" and attrs.get("tessera.workflow_id") in watched:
                loop.call_soon_threadsafe(step_ended.set)

    provider.add_span_processor(StepEnded())

    name = await start(mesh, plan("guard.spend", "guard.spend"))
    wf_id = name.split("/")[1]
    watched.append(wf_id)
    await mesh.finished(name)
    await asyncio.wait_for(step_ended.wait(), timeout=10)
    steps = [
        s
        for s in spans.get_finished_spans()
        if s.name == "workflow.step" and (s.attributes or {}).get("tessera.workflow_id") == wf_id
    ]
    assert steps
    (trace_id,) = {s.context.trace_id for s in steps}
    executions = [
        s
        for s in spans.get_finished_spans()
        # One span per attempt: its unary call's, or its own on the task stream.
        if s.name.endswith(("AgentService/ExecuteTask", "AgentService/ExecuteTasks task"))
        and s.context.trace_id == trace_id
        and s.kind == trace.SpanKind.SERVER
    ]
    assert len(executions) == 2  # both agent calls joined the workflow's trace
    starts = [s for s in spans.get_finished_spans() if s.name.endswith("/StartWorkflow")]
    assert trace_id in {s.context.trace_id for s in starts}
