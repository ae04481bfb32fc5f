"""The policy service as one object with start()/stop(): alone under `python -m
services.policy`, or in one process with others for tests."""

from __future__ import annotations

import uuid

import structlog
from nats.aio.client import Client

from services.policy.service import PolicyServicer
from services.policy.settings import PolicySettings
from tessera.audit import AuditWriter
from tessera.policy.distribution import PolicyPublisher
from tessera.policy.engine import LoadedPolicySet
from tessera.policy.store import PolicyStore
from tessera.runtime.bus import Topology, connect, declare, msg_id_headers
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.v1 import events_pb2, policy_pb2, policy_pb2_grpc
from tessera.vault.audit_keys import TransitSigner

log = structlog.get_logger(__name__)
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


class PolicyService:
    """Connects NATS (audit), loads the policy set (refusing to start on an invalid one),
    watches the files and serves ``tessera.v1.PolicyService``."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.store = PolicyStore(settings.policy_dir, poll_interval_s=settings.poll_interval_s)
        self._nc: Client | None = None
        self.audit: AuditWriter | None = None
        self.servicer: PolicyServicer | None = None
        self.server: GrpcServer | None = None
        self.workload: Workload | None = None
        self.publisher: PolicyPublisher | None = None

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("policy service not started")
        return self.server.address

    async def start(self) -> str:
        await self.store.start()
        within_s = self.settings.startup_timeout_s
        self.workload = await Workload.start(self.settings)
        self._nc = await connect(
            self.settings.nats_url,
            name=self.settings.instance_id,
            initial_timeout_s=within_s,
            **self.workload.nats_options(self.settings),
        )
        js = self._nc.jetstream()
        await declare(
            js,
            self.topology,
            replicas=self.settings.jetstream_replicas,
            within_s=within_s,
            leaders_of=streams_used("policy", self.topology),
        )
        self.audit = AuditWriter(
            js,
            self.topology,
            writer=self.settings.instance_id,
            actor="policy",
            publish_timeout_s=self.settings.audit_timeout_s,
        )
        await self.audit.start()
        servicer = PolicyServicer(
            self.store,
            self.audit,
            async_audit_queue=(
                self.settings.decision_audit_queue if self.settings.decision_audit == "async" else 0
            ),
            announce_reload=self._announce_reload,
            tests_dir=self.settings.policy_dir / "tests",
        )
        self.servicer = servicer
        vault = self.workload.vault  # the login Workload made (no second login)
        if vault is not None:  # checkpoints signed with the policy service's own Transit key
            self.audit.attach_signer(TransitSigner.for_client(vault))
        self.server = GrpcServer(
            name="policy",
            settings=self.settings,
            register=[lambda s: policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, s)],
            service_names=[SERVICE_NAME],
            identity=self.workload.certificate,
        )
        await self.server.start()
        # The administration point: every decision point elsewhere decides with this set.
        self.publisher = PolicyPublisher(
            js, self.topology, self.store, renew_interval_s=self.settings.lease_renew_s
        )
        await self.publisher.start()
        return self.server.address

    async def _announce_reload(self, ps: LoadedPolicySet) -> None:
        """Tell embedded decision points (tool proxies) to reload now (PolicyReloadRequested)."""
        assert self._nc is not None
        event = events_pb2.PolicyReloadRequested(policy_set_version=ps.version)
        event.time.GetCurrentTime()
        await self._nc.jetstream().publish(
            self.topology.policy_reload_subject,
            event.SerializeToString(),
            stream=self.topology.events_stream,
            headers=msg_id_headers(f"policy-reload-{uuid.uuid4()}"),
            timeout=self.settings.audit_timeout_s,
        )
        log.info("policy_reload_announced", version=ps.version)

    async def stop(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop()  # decision points go stale past their bound
            self.publisher = None
        if self.server is not None:
            await self.server.stop()
        if self.servicer is not None:
            await self.servicer.close(self.settings.audit_timeout_s)
            self.servicer = None
        await self.store.stop()
        if self.workload is not None:
            await self.workload.close()
            self.workload = None
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None
