"""An SDK agent in-process against the real NATS and the registry service: registration
over gRPC, once-only execution, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client

from services.coordinator.dispatcher import Dispatcher
from services.coordinator.task_streams import TaskStream
from services.registry.app import RegistryApp
from services.registry.settings import RegistrySettings
from tessera.agent import Agent, AgentSettings, Handoff, TaskContext, TaskResult, Usage
from tessera.agent._convert import to_value
from tessera.launcher.ports import free_port
from tessera.registry import Registry
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import error_details
from tessera.runtime.identity import Workload
from tessera.v1 import agent_pb2, agent_pb2_grpc, common_pb2


def billing_agent(runs: list[tuple[str, int]] | None = None) -> Agent:
    """``runs``: each execution of the handler appends its (task id, attempt)."""
    agent = Agent("billing", version="1.3.0")

    @agent.capability(
        "support.billing",
        version="1.2.0",
        side_effect="read_only",
        reads=["ticket"],
        writes=["billing_notes"],
        handoffs=["support.account"],
        timeout_s=5,
    )
    async def billing(ctx: TaskContext) -> TaskResult:
        if runs is not None:
            runs.append((ctx.task_id, ctx.attempt))
        text = ctx.blackboard["ticket"]["text"]
        return TaskResult(
            output={"seen": text},
            writes={"billing_notes": f"checked {text}"},
            summary="checked",
            handoff=Handoff("support.account", reason="account too"),
            confidence=0.8,
            usage=Usage(tokens=len(text) // 4),
        )

    return agent


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="test-agent-sdk")
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
async def registry_address(nats_url: str, namespace: str) -> AsyncIterator[str]:
    """The registry service agents register with (plaintext, like this test's NATS)."""
    registry = RegistryApp(
        RegistrySettings(nats_url=nats_url, namespace=namespace, listen="127.0.0.1:0")
    )
    await registry.start()
    try:
        yield registry.address
    finally:
        await registry.stop()


@pytest.fixture
def settings(nats_url: str, namespace: str, registry_address: str) -> AgentSettings:
    return AgentSettings.for_agent(
        "billing",
        nats_url=nats_url,
        namespace=namespace,
        registry_address=registry_address,
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
    )


@pytest.fixture
def runs() -> list[tuple[str, int]]:
    return []


@pytest.fixture
async def started(
    settings: AgentSettings, runs: list[tuple[str, int]]
) -> AsyncIterator[tuple[Agent, str]]:
    agent = billing_agent(runs)
    endpoint = await agent.start(settings=settings)
    try:
        yield agent, endpoint
    finally:
        await agent.stop()


@pytest.fixture
async def stub(started: tuple[Agent, str]) -> AsyncIterator[agent_pb2_grpc.AgentServiceStub]:
    async with grpc.aio.insecure_channel(started[1]) as ch:
        yield agent_pb2_grpc.AgentServiceStub(ch)


def execute_request(task_id: str = "t-1", attempt: int = 1) -> agent_pb2.ExecuteTaskRequest:
    req = agent_pb2.ExecuteTaskRequest(
        context=common_pb2.RequestContext(workflow_id="wf-1", task_id=task_id),
        capability="support.billing",
        attempt=attempt,
    )
    req.blackboard["ticket"].CopyFrom(to_value({"text": "refund my invoice"}))
    req.blackboard["other"].CopyFrom(to_value("hidden"))
    return req


async def test_an_agent_is_not_serving_until_the_registry_has_it(
    nats_url: str, namespace: str, nc: Client
) -> None:
    # `tessera up` and supervisors wait for SERVING: an agent reporting it before it was
    # registered let a plan naming its capability be refused as unknown.
    registry_port, agent_port = free_port(), free_port()
    settings = AgentSettings.for_agent(
        "billing",
        nats_url=nats_url,
        namespace=namespace,
        registry_address=f"127.0.0.1:{registry_port}",  # nothing listens there yet
        listen=f"127.0.0.1:{agent_port}",
        shutdown_grace_s=1.0,
    )
    agent = billing_agent()
    starting = asyncio.create_task(agent.start(settings=settings))
    registry = RegistryApp(
        RegistrySettings(
            nats_url=nats_url, namespace=namespace, listen=f"127.0.0.1:{registry_port}"
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{agent_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest()
            early = await health.Check(request, wait_for_ready=True, timeout=30)
            assert early.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not starting.done()  # still retrying its registration

            await registry.start()
            await asyncio.wait_for(starting, timeout=30)
            late = await health.Check(request, timeout=5)
            assert late.status == health_pb2.HealthCheckResponse.SERVING
        found = await Registry(nc.jetstream(), Topology(namespace)).find("support.billing", "^1.0")
        assert [d.instance_id for d, _ in found] == [agent.instance_id]
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await agent.stop()
        await registry.stop()


async def test_a_started_agent_is_registered_and_describes_itself(
    started: tuple[Agent, str], stub: agent_pb2_grpc.AgentServiceStub, nc: Client, namespace: str
) -> None:
    agent, endpoint = started
    registry = Registry(nc.jetstream(), Topology(namespace))

    found = await registry.find("support.billing", "^1.0")
    assert [(d.endpoint, c.version) for d, c in found] == [(endpoint, "1.2.0")]
    assert found[0][0].instance_id == agent.instance_id
    assert list(found[0][1].writes) == ["billing_notes"]
    assert await registry.find("support.billing", "^2.0") == []

    described = await stub.Describe(agent_pb2.DescribeRequest(), timeout=5)
    assert described.agent.name == "billing"
    assert described.agent.version == "1.3.0"
    assert described.agent.endpoint == endpoint
    assert [c.name for c in described.agent.capabilities] == ["support.billing"]


async def test_execute_round_trip_and_a_duplicate_attempt_runs_once(
    started: tuple[Agent, str], stub: agent_pb2_grpc.AgentServiceStub, runs: list[tuple[str, int]]
) -> None:
    first = await stub.ExecuteTask(execute_request(), timeout=5)
    assert first.output.json["seen"] == "refund my invoice"
    assert first.blackboard_writes["billing_notes"].string_value == "checked refund my invoice"
    assert first.handoff.capability == "support.account"
    assert first.has_confidence and first.confidence == pytest.approx(0.8)
    assert first.usage.tokens == 4

    again = await stub.ExecuteTask(execute_request(), timeout=5)
    assert again == first
    concurrent = await asyncio.gather(
        *(stub.ExecuteTask(execute_request(attempt=2), timeout=5) for _ in range(3))
    )
    assert all(r == concurrent[0] for r in concurrent)

    assert sorted(runs) == [("t-1", 1), ("t-1", 2)]  # once per attempt, whatever the calls


async def test_errors_carry_precise_statuses(stub: agent_pb2_grpc.AgentServiceStub) -> None:
    unknown = execute_request()
    unknown.capability = "support.nothing"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ExecuteTask(unknown, timeout=5)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(missing.value).reason == "CAPABILITY_NOT_FOUND"

    bad = execute_request(task_id="", attempt=0)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.ExecuteTask(bad, timeout=5)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in error_details(invalid.value).field_violations]
    assert fields == ["context.task_id", "attempt"]


async def test_attempts_over_one_task_stream_answer_as_unary_calls_do(
    stub: agent_pb2_grpc.AgentServiceStub, runs: list[tuple[str, int]]
) -> None:
    """The coordinator's streamed dispatch against the SDK's ExecuteTasks: attempts sent
    together on one stream are each answered (matched by call id), a duplicate attempt
    runs once, and a failure carries the status and details a unary call would."""
    stream = TaskStream(stub)
    try:
        answers = await asyncio.gather(
            *(stream.send(execute_request(task_id=f"s-{i}"), 5.0) for i in range(5)),
            stream.send(execute_request(task_id="s-0"), 5.0),
        )
        assert [a.output.json["seen"] for a in answers] == ["refund my invoice"] * 6
        assert answers[-1] == answers[0]
        assert sorted(runs) == [(f"s-{i}", 1) for i in range(5)]  # s-0 ran once

        unknown = execute_request(task_id="s-9")
        unknown.capability = "support.nothing"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stream.send(unknown, 5.0)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(missing.value).reason == "CAPABILITY_NOT_FOUND"
        bad = execute_request(task_id="", attempt=0)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stream.send(bad, 5.0)
        fields = [f for f, _ in error_details(invalid.value).field_violations]
        assert fields == ["context.task_id", "attempt"]
        # The stream outlived the failures: it still takes attempts.
        assert (await stream.send(execute_request(task_id="s-10"), 5.0)).usage.tokens == 4
        assert not stream.broken
    finally:
        await stream.close()


async def test_a_task_stream_to_a_stopped_agent_fails_its_attempts_as_transient(
    settings: AgentSettings,
) -> None:
    agent = billing_agent()
    endpoint = await agent.start(settings=settings)
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stream = TaskStream(agent_pb2_grpc.AgentServiceStub(ch))
        await stream.send(execute_request(), 5.0)
        await agent.stop()
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stream.send(execute_request(task_id="t-2"), 5.0)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE  # retried, not failed
        await stream.close()


async def test_shutdown_deregisters(settings: AgentSettings, nc: Client, namespace: str) -> None:
    registry = Registry(nc.jetstream(), Topology(namespace))
    agent = billing_agent()
    await agent.start(settings=settings)
    assert len(await registry.find("support.billing")) == 1
    changes = registry.watch()
    async with asyncio.timeout(5):
        joined = await anext(changes)
        assert (joined.kind, joined.instance_id) == ("put", agent.instance_id)

        await agent.stop()

        left = await anext(changes)
        assert (left.kind, left.instance_id, left.expired) == ("delete", agent.instance_id, False)
    await changes.aclose()
    assert await registry.find("support.billing") == []
    assert await registry.agents() == []


async def test_several_agents_in_one_process(
    settings: AgentSettings, nc: Client, namespace: str
) -> None:
    from services.agents.risk.agent import agent as risk_agent
    from services.agents.triage.agent import agent as triage_agent

    a, b = billing_agent(), billing_agent()  # two replicas of one agent
    endpoints = [await agent.start(settings=settings) for agent in (a, b, triage_agent, risk_agent)]
    try:
        assert len(set(endpoints)) == 4
        registry = Registry(nc.jetstream(), Topology(namespace))
        assert len(await registry.find("support.billing", "^1.2")) == 2
        assert len(await registry.find("support.triage", "^1.0")) == 1
        assert len(await registry.find("loan.risk", "^1.0")) == 1
    finally:
        for agent in (a, b, triage_agent, risk_agent):
            await agent.stop()


async def test_an_agent_process_registers_and_deregisters_on_sigterm(
    nats_url: str, nc: Client, namespace: str, registry_address: str
) -> None:
    env = {
        **os.environ,
        "TESSERA_NATS_URL": nats_url,
        "TESSERA_REGISTRY_ADDRESS": registry_address,
        "TESSERA_NAMESPACE": namespace,
        "TESSERA_AGENT_DOCUMENT_ANALYSIS_LISTEN": "127.0.0.1:0",
        "TESSERA_LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.agents.document_analysis",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await declare(nc.jetstream(), Topology(namespace))
    registry = Registry(nc.jetstream(), Topology(namespace))
    changes = registry.watch()
    try:
        async with asyncio.timeout(20):
            joined = await anext(changes)
        assert (joined.kind, joined.agent_name) == ("put", "document-analysis")
        [(descriptor, _)] = await registry.find("loan.document_analysis", "^1.0")
        async with grpc.aio.insecure_channel(descriptor.endpoint) as ch:
            described = await agent_pb2_grpc.AgentServiceStub(ch).Describe(
                agent_pb2.DescribeRequest(), timeout=5
            )
        assert described.agent.name == "document-analysis"

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            left = await anext(changes)
            assert (left.kind, left.agent_name, left.expired) == (
                "delete",
                "document-analysis",
                False,
            )
            assert await proc.wait() == 0
        assert await registry.agents() == []
    finally:
        await changes.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_agent_without_task_streams_gets_unary_calls() -> None:
    """An agent written without the SDK may implement ExecuteTask only: the dispatcher's
    first stream is refused (UNIMPLEMENTED), the attempt goes as a unary call, and so do
    the next ones (both paths of the coordinator's dispatch)."""
    calls: list[str] = []

    class UnaryOnly(agent_pb2_grpc.AgentServiceServicer):
        async def ExecuteTask(
            self, request: agent_pb2.ExecuteTaskRequest, context: grpc.aio.ServicerContext
        ) -> agent_pb2.ExecuteTaskResponse:
            calls.append(request.context.task_id)
            return agent_pb2.ExecuteTaskResponse(summary="unary", instance_id="u-1")

    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(UnaryOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dispatcher = Dispatcher(None, Workload(None))  # type: ignore[arg-type]
    descriptor = agent_pb2.AgentDescriptor(name="plain", endpoint=f"127.0.0.1:{port}")
    contract = common_pb2.CapabilityContract(name="support.billing")
    try:
        for task_id in ("u-1", "u-2"):
            answer = await dispatcher.send(
                descriptor, contract, execute_request(task_id=task_id), 5.0
            )
            assert answer.response.summary == "unary" and answer.agent_instance == "u-1"
        assert calls == ["u-1", "u-2"]
    finally:
        await dispatcher.close()
        await server.stop(None)
