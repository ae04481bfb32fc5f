"""The control plane's xDS protocol as any ADS client sees it: versions, nonces, ACK and
NACK, driven by real registry changes (real NATS; the client speaks the wire protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from services.gateway.ads import CLUSTER
from services.gateway.app import GatewayControlPlane
from services.gateway.settings import GatewaySettings
from tessera.registry import Registry
from tessera.runtime.bus import Topology
from tessera.v1 import agent_pb2
from tests.conftest import GATEWAY_DIR

PUBLIC = {"coordinator", "registry"}
"""Clusters routed whatever the agents: the public API, and the registry's freeze switch."""

Responses = asyncio.Queue[discovery_pb2.DiscoveryResponse]


@pytest.fixture
async def control_plane(nats_url: str, tmp_path: Path) -> AsyncIterator[GatewayControlPlane]:
    plane = GatewayControlPlane(
        GatewaySettings(
            nats_url=nats_url,
            namespace="t" + secrets.token_hex(4),
            listen="127.0.0.1:0",
            routes_file=GATEWAY_DIR / "routes.yaml",
            access_log=str(tmp_path / "access.log"),
            coordinator_address="127.0.0.1:1",
            route_agents=True,  # the opt-in these tests cover (off under `tessera up`)
        )
    )
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


@pytest.fixture
async def registry(nats_url: str, control_plane: GatewayControlPlane) -> AsyncIterator[Registry]:
    nc = await nats.connect(nats_url)
    try:
        yield Registry(nc.jetstream(), Topology(control_plane.settings.namespace))
    finally:
        await nc.close()


def cds(
    version: str = "", nonce: str = "", error: str | None = None
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=CLUSTER, version_info=version, response_nonce=nonce
    )
    request.node.id = "test-client"
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def cluster_names(response: discovery_pb2.DiscoveryResponse) -> set[str]:
    names = set()
    for resource in response.resources:
        cluster = cluster_pb2.Cluster()
        assert resource.Unpack(cluster)
        names.add(cluster.name)
    return names


async def nothing_within(responses: Responses, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        extra = await asyncio.wait_for(responses.get(), seconds)
        raise AssertionError(f"unexpected response {extra.version_info}")


async def test_versions_nonces_ack_and_nack(
    control_plane: GatewayControlPlane, registry: Registry
) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        responses: Responses = asyncio.Queue()

        async def read() -> None:
            async for response in call:
                responses.put_nowait(response)

        reader = asyncio.create_task(read())
        try:
            await call.write(cds())
            first = await asyncio.wait_for(responses.get(), 5)
            assert first.type_url == CLUSTER and first.nonce and first.version_info
            assert cluster_names(first) == PUBLIC

            await call.write(cds(first.version_info, first.nonce))  # ACK
            await nothing_within(responses, 0.5)  # nothing changed: nothing re-sent

            billing = agent_pb2.AgentDescriptor(
                name="billing", instance_id="b1", endpoint="127.0.0.1:7001"
            )
            await registry.register(billing)
            second = await asyncio.wait_for(responses.get(), 2)
            assert cluster_names(second) == PUBLIC | {"agent-billing"}
            assert second.version_info != first.version_info
            assert second.nonce != first.nonce

            # Rejected: the client keeps the first version; the server must not resend
            # the same content, and a stale nonce is ignored.
            await call.write(cds(first.version_info, second.nonce, error="bad cluster"))
            await call.write(cds(first.version_info, first.nonce))
            await nothing_within(responses, 0.5)

            # The next change is sent, with a fresh version and nonce.
            await registry.register(
                agent_pb2.AgentDescriptor(name="risk", instance_id="r1", endpoint="127.0.0.1:7002")
            )
            third = await asyncio.wait_for(responses.get(), 2)
            assert cluster_names(third) == PUBLIC | {"agent-billing", "agent-risk"}
            assert third.version_info not in (first.version_info, second.version_info)
            await call.write(cds(third.version_info, third.nonce))

            # Leaving the registry leaves CDS.
            await registry.deregister(billing)
            fourth = await asyncio.wait_for(responses.get(), 2)
            assert cluster_names(fourth) == PUBLIC | {"agent-risk"}
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
