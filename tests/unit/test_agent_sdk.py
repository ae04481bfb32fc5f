"""The agent SDK without a network: contracts, request validation, blackboard filtering,
once-only execution, limits and error mapping (``Agent.execute`` is what ExecuteTask serves)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.protobuf import struct_pb2

from tessera.agent import (
    DEFAULT_MAX_CONCURRENCY,
    Agent,
    Handoff,
    TaskContext,
    TaskResult,
    Usage,
    build_contract,
)
from tessera.agent._convert import to_value
from tessera.runtime.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tessera.v1 import agent_pb2, common_pb2


def request(
    capability: str = "demo.echo",
    *,
    workflow_id: str = "wf-1",
    task_id: str = "t-1",
    attempt: int = 1,
    input: dict[str, Any] | None = None,
    blackboard: dict[str, Any] | None = None,
) -> agent_pb2.ExecuteTaskRequest:
    req = agent_pb2.ExecuteTaskRequest(
        context=common_pb2.RequestContext(workflow_id=workflow_id, task_id=task_id),
        capability=capability,
        attempt=attempt,
        task_token="s.very-secret",
    )
    if input is not None:
        req.input.json.update(input)
    for key, value in (blackboard or {}).items():
        req.blackboard[key].CopyFrom(to_value(value))
    return req


def test_capability_decorator_builds_the_contract() -> None:
    agent = Agent("billing", version="2.0.0")

    @agent.capability(
        "support.billing",
        version="1.2.0",
        side_effect="idempotent_write",
        reads=["ticket", "category"],
        writes=["billing_notes"],
        tools=["billing.get_invoices"],
        handoffs=["support.account"],
        timeout_s=2.5,
        confidence_threshold=0.7,
        approval="conditional",
        cost_class="low",
        output_schema={"type": "object"},
    )
    async def billing(ctx: TaskContext) -> TaskResult:
        """Bills things."""
        return TaskResult()

    contract = agent.capabilities["support.billing"].contract
    assert contract.name == "support.billing"
    assert contract.version == "1.2.0"
    assert contract.description == "Bills things."
    assert list(contract.reads) == ["ticket", "category"]
    assert list(contract.writes) == ["billing_notes"]
    assert list(contract.tools) == ["billing.get_invoices"]
    assert list(contract.handoffs) == ["support.account"]
    assert contract.side_effect_class == common_pb2.SIDE_EFFECT_CLASS_IDEMPOTENT_WRITE
    assert contract.approval == common_pb2.APPROVAL_REQUIREMENT_CONDITIONAL
    assert contract.cost_class == common_pb2.COST_CLASS_LOW
    assert contract.timeout.ToMilliseconds() == 2500
    assert contract.max_concurrency == DEFAULT_MAX_CONCURRENCY
    assert contract.confidence_threshold == pytest.approx(0.7)
    assert contract.input_type == contract.output_type == "google.protobuf.Struct"
    assert contract.output_schema["type"] == "object"
    descriptor = agent.descriptor()
    assert (descriptor.name, descriptor.version) == ("billing", "2.0.0")
    assert [c.name for c in descriptor.capabilities] == ["support.billing"]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("Billing", {}, "lower-case dotted"),
        ("support.billing", {"version": "1.0"}, "invalid semantic version"),
        ("support.billing", {"timeout_s": 0}, "timeout_s"),
        ("support.billing", {"confidence_threshold": 1.5}, "confidence_threshold"),
        ("support.billing", {"side_effect": "sometimes"}, "side_effect"),
        ("support.billing", {"handoffs": ["Not A Name"]}, "handoff target"),
        ("support.billing", {"reads": "ticket"}, "must be a list"),
    ],
)
def test_invalid_declarations_are_refused(name: str, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"version": "1.0.0", "side_effect": "read_only", **kwargs}
    with pytest.raises(ValueError, match=message):
        build_contract(name, **args)


def test_a_capability_cannot_be_declared_twice() -> None:
    agent = Agent("a")

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def one(ctx: TaskContext) -> TaskResult:
        return TaskResult()

    with pytest.raises(ValueError, match="already offers"):
        agent.capability("demo.echo", version="1.0.0", side_effect="read_only")(one)


async def test_handler_sees_input_and_only_the_declared_blackboard_keys() -> None:
    agent = Agent("echo")
    seen: list[TaskContext] = []

    @agent.capability(
        "demo.echo",
        version="1.0.0",
        side_effect="read_only",
        reads=["ticket"],
        writes=["notes"],
        handoffs=["demo.next"],
    )
    async def echo(ctx: TaskContext) -> TaskResult:
        seen.append(ctx)
        return TaskResult(
            output={"got": ctx.input["q"]},
            writes={"notes": {"n": 1}},
            summary="echoed",
            handoff=Handoff("demo.next", reason="because", input={"x": 1}),
            confidence=0.75,
            usage=Usage(tokens=12, cost_micros=30),
            approval_request="look at this",
        )

    response = await agent.execute(
        request(
            input={"q": "hi"},
            blackboard={"ticket": {"text": "refund"}, "secret_plan": "not yours"},
        )
    )

    ctx = seen[0]
    assert ctx.blackboard == {"ticket": {"text": "refund"}}
    assert (ctx.workflow_id, ctx.task_id, ctx.attempt) == ("wf-1", "t-1", 1)
    assert "very-secret" not in repr(ctx)
    assert response.output.json["got"] == "hi"
    assert response.blackboard_writes["notes"].struct_value["n"] == 1
    assert response.summary == "echoed"
    assert response.handoff.capability == "demo.next"
    assert response.handoff.reason == "because"
    assert response.handoff.input.json["x"] == 1
    assert response.has_confidence and response.confidence == pytest.approx(0.75)
    assert (response.usage.tokens, response.usage.cost_micros) == (12, 30)
    assert response.approval_request.reason == "look at this"


async def test_no_confidence_reported_leaves_has_confidence_false() -> None:
    agent = Agent("quiet")

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        return TaskResult(output={"ok": True})

    response = await agent.execute(request())
    assert not response.has_confidence
    assert not response.HasField("handoff")
    assert not response.HasField("approval_request")


async def test_two_concurrent_calls_of_one_attempt_execute_once() -> None:
    agent = Agent("slow")
    calls = 0
    release = asyncio.Event()

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        nonlocal calls
        calls += 1
        await release.wait()
        return TaskResult(output={"n": calls})

    first = asyncio.create_task(agent.execute(request()))
    second = asyncio.create_task(agent.execute(request()))
    await asyncio.sleep(0.01)
    release.set()
    a, b = await asyncio.gather(first, second)
    again = await agent.execute(request())  # after completion: the cached response

    assert calls == 1
    assert a == b == again
    # Another attempt, or the same task id in another workflow, is a new execution.
    await agent.execute(request(attempt=2))
    await agent.execute(request(workflow_id="wf-2"))
    assert calls == 3


async def test_a_failed_attempt_is_not_cached() -> None:
    agent = Agent("flaky")
    calls = 0

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database password is hunter2")
        return TaskResult(output={"ok": True})

    with pytest.raises(Internal) as failure:
        await agent.execute(request())
    assert failure.value.reason == "HANDLER_FAILED"
    assert "hunter2" not in failure.value.message
    assert (await agent.execute(request())).output.json["ok"] is True


@pytest.mark.parametrize(
    ("req", "fields"),
    [
        (request(workflow_id=""), ["context.workflow_id"]),
        (request(task_id=""), ["context.task_id"]),
        (request(attempt=0), ["attempt"]),
        (
            request(capability="", workflow_id="", attempt=-1),
            ["context.workflow_id", "capability", "attempt"],
        ),
    ],
)
async def test_bad_requests_name_the_fields(
    req: agent_pb2.ExecuteTaskRequest, fields: list[str]
) -> None:
    agent = Agent("v")

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        return TaskResult()

    with pytest.raises(InvalidArgument) as bad:
        await agent.execute(req)
    assert [f for f, _ in bad.value.field_violations] == fields


async def test_unknown_capability_is_not_found() -> None:
    agent = Agent("v")

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        return TaskResult()

    with pytest.raises(NotFound) as missing:
        await agent.execute(request("demo.other"))
    assert missing.value.reason == "CAPABILITY_NOT_FOUND"


async def test_a_typed_input_of_the_wrong_type_is_refused() -> None:
    agent = Agent("v")

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        return TaskResult()

    req = request()
    req.input.typed.Pack(common_pb2.Usage(tokens=1))
    with pytest.raises(InvalidArgument, match="input type"):
        await agent.execute(req)
    struct_input = request()
    struct_input.input.typed.Pack(struct_pb2.Struct())
    await agent.execute(struct_input)


async def test_over_the_concurrency_limit_is_resource_exhausted() -> None:
    agent = Agent("busy")
    release = asyncio.Event()

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only", max_concurrency=1)
    async def echo(ctx: TaskContext) -> TaskResult:
        await release.wait()
        return TaskResult()

    running = asyncio.create_task(agent.execute(request(task_id="a")))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted) as busy:
        await agent.execute(request(task_id="b"))
    assert busy.value.retry_after_s is not None
    joined = asyncio.create_task(agent.execute(request(task_id="a")))  # a join takes no slot
    release.set()
    await asyncio.gather(running, joined)
    await agent.execute(request(task_id="b"))  # the slot is free again


async def test_the_handler_runs_under_the_capability_timeout() -> None:
    agent = Agent("sleepy")

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only", timeout_s=0.05)
    async def echo(ctx: TaskContext) -> TaskResult:
        await asyncio.sleep(5)
        return TaskResult()

    with pytest.raises(DeadlineExceeded) as late:
        await agent.execute(request())
    assert late.value.reason == "CAPABILITY_TIMEOUT"


async def test_the_caller_going_away_does_not_cancel_the_execution() -> None:
    agent = Agent("patient")
    release = asyncio.Event()
    calls = 0

    @agent.capability("demo.echo", version="1.0.0", side_effect="read_only")
    async def echo(ctx: TaskContext) -> TaskResult:
        nonlocal calls
        calls += 1
        await release.wait()
        return TaskResult(output={"done": True})

    impatient = asyncio.create_task(agent.execute(request()))
    await asyncio.sleep(0.01)
    impatient.cancel()
    release.set()
    retry = await agent.execute(request())
    assert retry.output.json["done"] is True
    assert calls == 1


async def test_call_tool_without_a_proxy_fails_precisely() -> None:
    ctx = TaskContext(capability="demo.echo")
    from tessera.runtime.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="no tool proxy"):
        await ctx.call_tool("kb.search", {"q": "x"})
