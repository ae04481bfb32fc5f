"""The gateway control plane as one object with start()/stop(): alone under
`python -m services.gateway`, or beside other services in one process for tests.

It follows the registry (NATS KV) and serves Envoy, over ADS, a listener with the edge
features, the routes, one cluster per public service and one EDS cluster per agent name
(``agent-<name>``, endpoints = live replicas). A registry change reaches every connected
Envoy within ``debounce_s`` plus one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc
from nats.aio.client import Client

from services.gateway.ads import ADS_SERVICE_NAME, AggregatedDiscoveryServer, SnapshotCache
from services.gateway.envoy_identity import write_files
from services.gateway.jwks import JwksFollower
from services.gateway.resources import agent_endpoints, to_snapshot
from services.gateway.settings import GatewaySettings
from tessera.identity.source import CertificateSource
from tessera.launcher.gateway import (
    COORDINATOR_A2A_SERVICES,
    MCP_PUBLIC_METHODS,
    POLICY_PUBLIC_METHODS,
    REGISTRY_PUBLIC_METHODS,
    HumanAuth,
    Upstream,
    UpstreamTls,
    build_resources,
    load_edge_config,
    tls_secrets,
)
from tessera.registry import Registry, registry_key
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.runtime.startup import until_ready
from tessera.v1 import agent_pb2

__all__ = ["SERVICE_NAME", "GatewayControlPlane"]

log = structlog.get_logger(__name__)
SERVICE_NAME = ADS_SERVICE_NAME
_WATCH_BACKOFF_MAX_S = 5.0
ENVOY_IDENTITY = "gateway"


class GatewayControlPlane:
    """Serves ``envoy.service.discovery.v3.AggregatedDiscoveryService`` (and health)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.cache = SnapshotCache()
        self.server: GrpcServer | None = None
        self._edge: dict[str, Any] = {}
        self._upstreams: list[Upstream] = []
        self._nc: Client | None = None
        self._registry: Registry | None = None
        self._replicas: dict[str, agent_pb2.AgentDescriptor] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.workload: Workload | None = None
        self._envoy_identity: CertificateSource | None = None
        self._tls: UpstreamTls | None = None
        self._jwks: JwksFollower | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def _public_upstreams(self) -> list[Upstream]:
        public = [
            # The coordinator also serves the A2A face and its agent cards.
            (
                "coordinator",
                self.settings.coordinator_address,
                ("tessera.v1.CoordinatorService", *COORDINATOR_A2A_SERVICES),
            ),
            ("planner", self.settings.planner_address, ("tessera.v1.PlannerService",)),
            ("console", self.settings.console_address, ("tessera.v1.ConsoleService",)),
            ("audit-reader", self.settings.audit_reader_address, ("tessera.v1.AuditService",)),
        ]
        upstreams = [
            Upstream(name, address, services) for name, address, services in public if address
        ]
        if self.settings.registry_address:  # its freeze switch only, for people
            upstreams.append(
                Upstream(
                    "registry",
                    self.settings.registry_address,
                    ("tessera.v1.RegistryService",),
                    methods=REGISTRY_PUBLIC_METHODS,
                )
            )
        if self.settings.tool_proxy_address:  # its MCP face, for people's MCP clients
            upstreams.append(
                Upstream(
                    "tool-proxy",
                    self.settings.tool_proxy_address,
                    ("tessera.v1.McpService",),
                    methods=MCP_PUBLIC_METHODS,
                )
            )
        if self.settings.policy_address:  # the served set's version and coverage, for people
            upstreams.append(
                Upstream(
                    "policy",
                    self.settings.policy_address,
                    ("tessera.v1.PolicyService",),
                    methods=POLICY_PUBLIC_METHODS,
                )
            )
        return upstreams

    async def start(self) -> str:
        """Load the edge policy, sync the registry, then serve; the listening address."""
        settings = self.settings
        self._edge = load_edge_config(settings.routes_file)
        if settings.descriptor_set is not None and not settings.descriptor_set.is_file():
            raise FileNotFoundError(f"descriptor set {settings.descriptor_set} does not exist")
        self._upstreams = self._public_upstreams()
        within_s = settings.startup_timeout_s
        self.workload = await Workload.start(settings)
        self._nc = await connect(
            settings.nats_url,
            name="gateway",
            initial_timeout_s=within_s,
            **self.workload.nats_options(settings),
        )
        js = self._nc.jetstream()
        await declare(
            js,
            self.topology,
            replicas=settings.jetstream_replicas,
            within_s=within_s,
            leaders_of=streams_used("gateway-control-plane", self.topology),
        )
        registry = self._registry = Registry(js, self.topology)
        live = await until_ready(registry.agents, what="registry read", within_s=within_s)
        self._replicas = {registry_key(d.name, d.instance_id): d for d in live}
        if self.workload.certificate is not None:
            self._envoy_identity = await self.workload.issue_for(ENVOY_IDENTITY)
            self._tls = UpstreamTls(trust_domain=self.workload.certificate.name.trust_domain)
            self._envoy_identity.subscribe(self._envoy_renewed)
            if settings.cert_dir is not None:
                write_files(self._envoy_identity, settings.cert_dir)
        if settings.jwt_issuer:
            url = settings.jwks_url or settings.jwt_issuer.rstrip("/") + "/.well-known/keys"
            self._jwks = JwksFollower(
                url, refresh_s=settings.jwks_refresh_s, on_change=self._dirty.set
            )
            await self._jwks.first(within_s=within_s)
        elif self.workload.certificate is not None:
            raise ValueError(
                "TESSERA_GATEWAY_JWT_ISSUER is not set: a secured mesh's front door must "
                "authenticate people (only a plaintext debug mesh may leave it open)"
            )
        else:
            log.warning("gateway_front_door_unauthenticated", reason="plaintext debug mesh")
        await self._publish()  # a bad edge policy fails start(), not a later update
        servicer = AggregatedDiscoveryServer(self.cache, identifier=f"tessera-gateway/{id(self)}")
        self.server = GrpcServer(
            name="gateway",
            settings=settings,
            register=[
                lambda s: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, s)
            ],
            service_names=[SERVICE_NAME],
            identity=self.workload.certificate,
        )
        self._tasks = [
            asyncio.create_task(self._follow_registry(), name="gateway-registry"),
            asyncio.create_task(self._publisher(), name="gateway-publisher"),
        ]
        if self._jwks is not None:
            self._tasks.append(asyncio.create_task(self._jwks.run(), name="gateway-jwks"))
        await self.server.start()
        return self.server.address

    async def stop(self) -> None:
        """Stop serving, following the registry and NATS. Idempotent."""
        if self.server is not None:
            await self.server.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._envoy_identity is not None:
            await self._envoy_identity.close()
            self._envoy_identity = None
        if self.workload is not None:
            await self.workload.close()
            self.workload = None
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.drain()

    def _envoy_renewed(self) -> None:
        """A renewed Envoy certificate: new files for the ADS connection, new SDS secret."""
        if self._envoy_identity is not None and self.settings.cert_dir is not None:
            write_files(self._envoy_identity, self.settings.cert_dir)
        self._dirty.set()

    def _secrets(self) -> list[dict[str, Any]]:
        if self._envoy_identity is None or self._tls is None:
            return []
        current = self._envoy_identity.current
        return tls_secrets(
            self._tls,
            certificate=current.certificate,
            private_key=current.private_key,
            ca="\n".join(current.ca_chain),
        )

    async def _publish(self) -> None:
        agents = (
            await agent_endpoints(self._replicas.values()) if self.settings.route_agents else {}
        )
        resources = build_resources(
            self._edge,
            listen=self.settings.envoy_listen,
            access_log=self.settings.access_log,
            upstreams=self._upstreams,
            health_upstream="coordinator"
            if any(u.name == "coordinator" for u in self._upstreams)
            else None,
            agents=agents,
            descriptor_set=self.settings.descriptor_set,
            dynamic=True,
            tls=self._tls,
            human_auth=self._human_auth(),
        )
        resources = dataclasses.replace(resources, secrets=self._secrets())
        self.cache.set(to_snapshot(resources))
        log.info(
            "gateway_snapshot",
            agents=len(agents),
            replicas=sum(len(e) for e in agents.values()),
            clusters=len(resources.clusters),
        )

    def _human_auth(self) -> HumanAuth | None:
        if self._jwks is None:
            return None
        return HumanAuth(
            issuer=self.settings.jwt_issuer,
            audiences=tuple(self.settings.jwt_audiences),
            jwks=self._jwks.current,
            subject_claim=self.settings.jwt_subject_claim,
            clock_skew_s=self.settings.jwt_clock_skew_s,
        )

    async def _publisher(self) -> None:
        """Turn bursts of registry changes into one snapshot each."""
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.settings.debounce_s)
            self._dirty.clear()
            try:
                await self._publish()
            except Exception as exc:  # keep serving the last good snapshot
                log.error("gateway_snapshot_failed", error=repr(exc))

    async def _follow_registry(self) -> None:
        """Apply registry changes; after a failure, resync from a full read, with backoff."""
        assert self._registry is not None
        backoff = 0.1
        while True:
            try:
                async for change in self._registry.watch():
                    backoff = 0.1
                    if change.kind == "put" and change.descriptor is not None:
                        self._replicas[change.key] = change.descriptor
                    else:
                        self._replicas.pop(change.key, None)
                    log.info(
                        "registry_change",
                        kind=change.kind,
                        agent=change.agent_name,
                        instance_id=change.instance_id,
                        expired=change.expired,
                    )
                    self._dirty.set()
                log.warning("registry_watch_ended")
            except Exception as exc:  # NATS outage, bucket gone...: resync below
                log.warning("registry_watch_failed", error=repr(exc), retry_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX_S)
            try:
                fresh = await self._registry.agents()
            except Exception as exc:
                log.warning("registry_resync_failed", error=repr(exc))
                continue
            self._replicas = {registry_key(d.name, d.instance_id): d for d in fresh}
            self._dirty.set()
