"""The live registry in NATS KV: register, find by version, stale heartbeats, watch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from tessera.registry import Registry, RegistryChange, registry_key
from tessera.runtime.bus import Topology, connect, declare
from tessera.v1 import agent_pb2, common_pb2


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc: Client = await connect(nats_url, name="test-registry")
    try:
        yield nc.jetstream()
    finally:
        await nc.drain()


@pytest.fixture
async def topology(js: JetStreamContext, namespace: str) -> Topology:
    topology = Topology(namespace)
    await declare(js, topology)
    return topology


def replica(name: str, instance: str, *caps: tuple[str, str]) -> agent_pb2.AgentDescriptor:
    return agent_pb2.AgentDescriptor(
        name=name,
        version="1.0.0",
        instance_id=instance,
        endpoint=f"127.0.0.1:{1000 + len(instance)}",
        capabilities=[common_pb2.CapabilityContract(name=c, version=v) for c, v in caps],
    )


async def test_find_returns_fresh_compatible_replicas_highest_version_first(
    js: JetStreamContext, topology: Topology
) -> None:
    registry = Registry(js, topology)
    await registry.register(replica("billing", "b1", ("support.billing", "1.0.0")))
    await registry.register(replica("billing", "b2", ("support.billing", "1.4.0")))
    await registry.register(replica("billing", "b3", ("support.billing", "2.0.0")))
    await registry.register(replica("triage", "t1", ("support.triage", "1.0.0")))

    found = await registry.find("support.billing", "^1.0")
    assert [(a.instance_id, c.version) for a, c in found] == [("b2", "1.4.0"), ("b1", "1.0.0")]
    assert [a.instance_id for a, _ in await registry.find("support.billing")] == ["b3", "b2", "b1"]
    assert await registry.find("support.billing", ">=3.0.0") == []
    assert await registry.find("support.nothing") == []
    with pytest.raises(ValueError, match="invalid version constraint"):
        await registry.find("support.billing", "latest")

    agents = await registry.agents()
    assert [a.instance_id for a in agents] == ["b1", "b2", "b3", "t1"]
    assert all(a.HasField("heartbeat_time") for a in agents)
    capabilities = await registry.capabilities()
    assert [c.version for c in capabilities["support.billing"]] == ["2.0.0", "1.4.0", "1.0.0"]
    assert list(capabilities) == ["support.billing", "support.triage"]


async def test_stale_and_deregistered_entries_are_not_live(
    js: JetStreamContext, topology: Topology
) -> None:
    registry = Registry(js, topology)
    gone = replica("billing", "old", ("support.billing", "1.0.0"))
    # A replica that died 60 s ago: the bucket may still hold it, readers must not.
    gone.heartbeat_time.FromSeconds(int(time.time()) - 60)
    kv = await js.key_value(topology.registry_bucket)
    await kv.put(registry_key("billing", "old"), gone.SerializeToString())
    await kv.put("agent.billing.garbage", b"\xff\xff not a protobuf")
    live = replica("billing", "new", ("support.billing", "1.0.0"))
    await registry.register(live)

    assert [a.instance_id for a, _ in await registry.find("support.billing")] == ["new"]
    await registry.deregister(live)
    assert await registry.find("support.billing") == []
    assert await registry.agents() == []


async def test_watch_reports_joins_leaves_and_expiry_but_not_heartbeats(
    js: JetStreamContext, topology: Topology
) -> None:
    short = Topology(topology.namespace, registry_ttl_s=1.0)
    registry = Registry(js, short)
    await registry.register(replica("credit", "c0", ("risk.credit", "1.0.0")))
    changes: asyncio.Queue[RegistryChange] = asyncio.Queue()

    async def consume() -> None:
        async for change in registry.watch(check_interval_s=0.1):
            await changes.put(change)

    watcher = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(10):
            first = await changes.get()
            assert (first.kind, first.instance_id) == ("put", "c0")  # the initial state

            leaving = replica("fraud", "f1", ("risk.fraud", "1.0.0"))
            await registry.register(leaving)
            await registry.register(leaving)  # a heartbeat: no change reported
            joined = await changes.get()
            assert (joined.kind, joined.agent_name, joined.instance_id) == ("put", "fraud", "f1")
            assert joined.descriptor is not None
            assert joined.descriptor.capabilities[0].name == "risk.fraud"

            await registry.deregister(leaving)
            left = await changes.get()
            assert (left.kind, left.instance_id, left.expired) == ("delete", "f1", False)

            # c0 never beats again: it expires from the live set.
            expired = await changes.get()
            assert (expired.kind, expired.instance_id, expired.expired) == ("delete", "c0", True)
        assert changes.empty()
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
