"""The gateway as a caller and an agent team see it: a real Envoy configured over ADS by
the gateway control plane, the real coordinator behind it, agents found in the registry.

One stack per module: NATS (session fixture), a coordinator, the control plane and an
Envoy bootstrapped from ``gateway/envoy.yaml``, people in an OpenBao of the module's own
(their identity tokens are what Envoy verifies). Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.coordinator.app import SERVICE_NAME as COORDINATOR
from services.coordinator.app import Coordinator
from services.coordinator.settings import CoordinatorSettings
from services.gateway.app import GatewayControlPlane
from services.gateway.settings import GatewaySettings
from services.planner.service import PlannerService
from services.planner.settings import PlannerSettings
from tessera.launcher import infra
from tessera.launcher.descriptors import build_descriptor_set
from tessera.launcher.ports import free_port
from tessera.registry import Registry
from tessera.runtime.bus import Topology
from tessera.runtime.grpc_client import metadata_interceptors
from tessera.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc
from tessera.vault.humans import HumansSpec
from tests.conftest import GATEWAY_DIR, PROJECT_ROOT, private_openbao
from tests.integration.people import People, start_people

PROPAGATION_S = 2.0  # a registry change must reach Envoy within this


@dataclass(frozen=True)
class Stack:
    namespace: str
    nats_url: str
    coordinator: Coordinator
    control_plane: GatewayControlPlane
    envoy: infra.EnvoyServer
    access_log: Path
    people: People

    def bearer(self, user: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.people.token(user)}")]

    def channel(self, user: str | None = "tester") -> grpc.aio.Channel:
        """A gRPC channel to Envoy whose calls carry ``user``'s token (None: no token)."""
        interceptors = metadata_interceptors(self.bearer(user)) if user else []
        return grpc.aio.insecure_channel(self.envoy.address, interceptors=interceptors)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.envoy.address.rpartition(":")
        return host, int(port)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    stack: Stack,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    as_user: str | None = "tester",
) -> Reply:
    """One HTTP/1.1 request to the gateway listener, with ``as_user``'s token."""
    host, port = stack.host_port
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sent = {
            "content-type": "application/json",
            **dict(stack.bearer(as_user) if as_user else {}),
        }
        sent.update(headers or {})
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def admin(stack: Stack, path: str) -> str:
    host, port = stack.envoy.admin_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def envoy_pid(stack: Stack) -> int:
    """The Envoy process itself (the launcher's keeper shell is its parent)."""
    keeper = stack.envoy.pid
    children = Path(f"/proc/{keeper}/task/{keeper}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


async def eventually(check: Any, *, within: float, what: str) -> float:
    """Poll ``check()`` (sync, run in a thread) until true; the seconds it took."""
    start = time.monotonic()
    while True:
        if await asyncio.to_thread(check):
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


def cluster_hosts(stack: Stack, cluster: str) -> set[str]:
    """``ip:port`` of every host Envoy's /clusters lists for ``cluster``."""
    hosts = set()
    for line in admin(stack, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) >= 3 and parts[0] == cluster and ":" in parts[1]:
            hosts.add(parts[1])
    return hosts


# --- the stack ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_descriptor_set(PROJECT_ROOT, tmp_path_factory.mktemp("gateway") / "tessera.binpb")


BURST = 20
"""Requests per person per module stack (no refill): tests act as "tester" well below it;
the rate-limit test exhausts it for its own users."""


@pytest.fixture(scope="module")
def routes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gateway/routes.yaml with a per-caller bucket small enough to exhaust in a test."""
    edge = yaml.safe_load((GATEWAY_DIR / "routes.yaml").read_text())
    edge["rate_limit"]["per_caller"] = {
        "max_tokens": BURST,
        "tokens_per_fill": BURST,
        "fill_interval": "3600s",
    }
    path = tmp_path_factory.mktemp("gateway-routes") / "routes.yaml"
    path.write_text(yaml.safe_dump(edge))
    return path


PEOPLE = HumansSpec.model_validate(
    {
        "token": {"audience": "tessera", "ttl": "1h"},
        "groups": {"approvers": "decide gates", "support": "start support workflows"},
        "users": [{"name": n, "groups": ["approvers"]} for n in ("tester", "alice", "bob", "carol")]
        + [{"name": "auditor", "groups": []}],
    }
)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Iterator[People]:
    directory = tmp_path_factory.mktemp("gateway-people")
    with private_openbao(directory) as openbao:
        yield start_people(openbao, directory / "secrets", PEOPLE)


@pytest.fixture(scope="module")
async def stack(
    nats_url: str, infra_dir: Path, descriptor_set: Path, routes_file: Path, people: People
) -> AsyncIterator[Stack]:
    namespace = "t" + secrets.token_hex(4)
    planner = PlannerService(
        PlannerSettings(nats_url=nats_url, namespace=namespace, listen="127.0.0.1:0")
    )
    await planner.start()
    coordinator = Coordinator(
        CoordinatorSettings(
            nats_url=nats_url,
            namespace=namespace,
            listen="127.0.0.1:0",
            planner_address=planner.address,
            run_workers=False,  # workflows stay where StartWorkflow left them
        )
    )
    await coordinator.start()
    listen_port, admin_port = free_port(), free_port()
    access_log = infra_dir / "logs" / f"gw-{namespace}-access.log"
    control_plane = GatewayControlPlane(
        GatewaySettings(
            nats_url=nats_url,
            namespace=namespace,
            listen="127.0.0.1:0",
            envoy_listen=f"127.0.0.1:{listen_port}",
            access_log=str(access_log),
            routes_file=routes_file,
            descriptor_set=descriptor_set,
            coordinator_address=coordinator.address,
            route_agents=True,  # the opt-in these tests cover (off under `tessera up`)
            jwt_issuer=people.issuer,
            jwt_clock_skew_s=1,  # the expiry test waits for exp + 1 s, not the default 30
            jwks_refresh_s=0.5,  # the key rotation test waits for it
        )
    )
    await control_plane.start()
    name = f"envoy-gw-{namespace}"
    try:
        envoy = await asyncio.to_thread(
            infra.start_envoy,
            infra_dir,
            port=listen_port,
            admin_port=admin_port,
            gateway_dir=GATEWAY_DIR,
            xds_address=control_plane.address,
            name=name,
        )
        yield Stack(namespace, nats_url, coordinator, control_plane, envoy, access_log, people)
    finally:
        await asyncio.to_thread(infra.stop, infra_dir, name)
        await control_plane.stop()
        await coordinator.stop()
        await planner.stop()


@pytest.fixture
async def registry(stack: Stack) -> AsyncIterator[Registry]:
    nc = await nats.connect(stack.nats_url)
    try:
        yield Registry(nc.jetstream(), Topology(stack.namespace))
    finally:
        await nc.close()


@pytest.fixture
async def risk_agent(registry: Registry) -> AsyncIterator[agent_pb2.AgentDescriptor]:
    """A registered replica offering what the planner's `risk` template needs (its
    endpoint is never called: these stacks run no workers)."""
    me = agent_pb2.AgentDescriptor(
        name="risk",
        version="1.0.0",
        instance_id="r1",
        endpoint="127.0.0.1:1",
        capabilities=[
            common_pb2.CapabilityContract(
                name="risk.credit", version="1.0.0", tools=["credit.bureau_report"]
            ),
            common_pb2.CapabilityContract(name="risk.fraud", version="1.0.0"),
            common_pb2.CapabilityContract(name="risk.churn", version="1.0.0"),
            common_pb2.CapabilityContract(name="risk.aggregate", version="1.0.0"),
        ],
    )
    await registry.register(me)
    yield me
    await registry.deregister(me)


def descriptor(name: str, instance: str, endpoint: str) -> agent_pb2.AgentDescriptor:
    return agent_pb2.AgentDescriptor(
        name=name, version="1.0.0", instance_id=instance, endpoint=endpoint
    )


# --- (a) the registry drives Envoy live -----------------------------------------------------


async def test_agent_replicas_join_and_leave_envoy_within_two_seconds(
    stack: Stack, registry: Registry
) -> None:
    pid = envoy_pid(stack)
    first = descriptor("billing", "b1", f"127.0.0.1:{free_port()}")
    second = descriptor("billing", "b2", f"127.0.0.1:{free_port()}")

    await registry.register(first)
    await eventually(
        lambda: cluster_hosts(stack, "agent-billing") == {first.endpoint},
        within=PROPAGATION_S,
        what="first replica in /clusters",
    )
    await registry.register(second)
    await eventually(
        lambda: cluster_hosts(stack, "agent-billing") == {first.endpoint, second.endpoint},
        within=PROPAGATION_S,
        what="second replica in /clusters",
    )
    await registry.deregister(first)
    await eventually(
        lambda: cluster_hosts(stack, "agent-billing") == {second.endpoint},
        within=PROPAGATION_S,
        what="first replica gone from /clusters",
    )
    await registry.deregister(second)
    await eventually(
        lambda: "agent-billing::" not in admin(stack, "/clusters"),
        within=PROPAGATION_S,
        what="agent-billing gone once its last replica left",
    )
    assert envoy_pid(stack) == pid  # reconfigured live, never restarted
    # Envoy ACKed every update: the live config is the control plane's latest.
    dump = json.loads(admin(stack, "/config_dump?resource=dynamic_active_clusters"))
    assert not any(c["cluster"]["name"] == "agent-billing" for c in dump["configs"])


# --- (b) gRPC through Envoy ---------------------------------------------------------------


class _EchoAgent(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, me: agent_pb2.AgentDescriptor) -> None:
        self.me = me

    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.DescribeResponse:
        return agent_pb2.DescribeResponse(agent=self.me)

    async def ExecuteTask(
        self, request: agent_pb2.ExecuteTaskRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ExecuteTaskResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo agent runs no tasks")
        raise AssertionError("unreachable: abort raises")


@pytest.fixture
async def echo_agent() -> AsyncIterator[agent_pb2.AgentDescriptor]:
    """A real gRPC server speaking AgentService (Describe) and health."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    me = descriptor("echo", "e1", f"127.0.0.1:{port}")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(_EchoAgent(me), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield me
    finally:
        await server.stop(0)


async def test_grpc_calls_reach_the_coordinator_and_agents_by_header(
    stack: Stack, registry: Registry, echo_agent: agent_pb2.AgentDescriptor
) -> None:
    async with stack.channel() as channel:
        coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await coordinator.GetWorkflow(
                coordinator_pb2.GetWorkflowRequest(name="workflows/nope"), timeout=5
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        agents = agent_pb2_grpc.AgentServiceStub(channel)
        await registry.register(echo_agent)
        try:
            deadline = time.monotonic() + PROPAGATION_S
            while True:
                try:
                    reply = await agents.Describe(
                        agent_pb2.DescribeRequest(),
                        metadata=[("x-tessera-agent", "echo")],
                        timeout=2,
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"agent route not live: {exc.code()}") from exc
                    await asyncio.sleep(0.05)
            assert reply.agent.instance_id == echo_agent.instance_id
            # The agent's own health, through the gateway, by the same header.
            checked = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=[("x-tessera-agent", "echo")], timeout=2
            )
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unrouted:
                await agents.Describe(agent_pb2.DescribeRequest(), timeout=2)
            assert unrouted.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await registry.deregister(echo_agent)


# --- (e) /healthz -------------------------------------------------------------------------


async def test_healthz_follows_the_coordinators_grpc_health(stack: Stack) -> None:
    assert (await asyncio.to_thread(request, stack, "GET", "/healthz")).status == 200
    server = stack.coordinator.server
    assert server is not None
    await server.health.set(COORDINATOR, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        await eventually(
            lambda: request(stack, "GET", "/healthz").status == 503,
            within=10,
            what="/healthz 503 while the coordinator is NOT_SERVING",
        )
    finally:
        await server.health.set(COORDINATOR, health_pb2.HealthCheckResponse.SERVING)
    await eventually(
        lambda: request(stack, "GET", "/healthz").status == 200,
        within=10,
        what="/healthz 200 again",
    )


# --- access log ---------------------------------------------------------------------------


async def test_access_log_is_json_with_the_verified_subject_and_no_token(stack: Stack) -> None:
    reply = await asyncio.to_thread(request, stack, "GET", "/v1/workflows/nope", as_user="auditor")
    assert reply.status == 404

    def records() -> list[dict[str, Any]]:
        path = stack.access_log
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    await eventually(
        lambda: any(r["subject"] == "auditor" for r in records()),
        within=5,
        what="the request in the access log",
    )
    mine = [r for r in records() if r["subject"] == "auditor"]
    token = stack.people.token("auditor")
    assert token.split(".")[2] not in stack.access_log.read_text()  # a bearer credential
    assert mine[0]["upstream_cluster"] == "coordinator"
    assert mine[0]["original_path"] == "/v1/workflows/nope"
    assert mine[0]["path"] == "/tessera.v1.CoordinatorService/GetWorkflow"
    assert mine[0]["response_code"] == 404
