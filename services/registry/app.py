"""The registry service as one object with start()/stop(): alone under `python -m
services.registry`, or in one process with others for tests.

It is the only identity NATS lets write the registry bucket
(tessera/runtime/nats_permissions.py); agents hold no NATS credentials at all.
"""

from __future__ import annotations

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.registry.service import RegistryServicer
from services.registry.settings import RegistrySettings
from tessera.audit import AuditWriter
from tessera.frozen import FrozenAgents
from tessera.policy.control_plane import ChainAuditor, ControlPlaneAuthorization
from tessera.policy.distribution import DistributedPolicySet
from tessera.registry import Registry
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.v1 import audit_pb2, registry_pb2, registry_pb2_grpc
from tessera.vault.audit_keys import TransitSigner

log = structlog.get_logger(__name__)
SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class RegistryApp:
    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self._nc: Client | None = None
        self.audit: AuditWriter | None = None
        self.server: GrpcServer | None = None
        self.workload: Workload | None = None
        self.distributed: DistributedPolicySet | None = None

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("registry service not started")
        return self.server.address

    async def start(self) -> str:
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
            leaders_of=streams_used("registry", self.topology),
        )
        self.audit = AuditWriter(
            js,
            self.topology,
            writer=self.settings.instance_id,
            actor="registry",
            publish_timeout_s=self.settings.audit_timeout_s,
        )
        await self.audit.start()
        vault = self.workload.vault
        if vault is not None:  # checkpoints signed with the registry's own Transit key
            self.audit.attach_signer(TransitSigner.for_client(vault))
        servicer = RegistryServicer(
            Registry(js, self.topology),
            self.audit,
            FrozenAgents(js, self.topology),
            write_timeout_s=self.settings.write_timeout_s,
            authz=await self._authorization(js),
        )
        self.server = GrpcServer(
            name="registry",
            settings=self.settings,
            register=[
                lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, s)
            ],
            service_names=[SERVICE_NAME],
            identity=self.workload.certificate,
            on_refused=self._audit_refused_caller,
        )
        await self.server.start()
        log.info("registry_started", address=self.server.address)
        return self.server.address

    async def _authorization(self, js: JetStreamContext) -> ControlPlaneAuthorization:
        """The decision point for freezes: the distributed policy set (none on a plaintext
        debug registry, where nothing is authenticated to authorize)."""
        assert self.audit is not None and self.workload is not None
        if self.workload.certificate is None:
            log.warning("freezes_unauthorized", reason="plaintext debug registry")
            return ControlPlaneAuthorization(None, None)
        self.distributed = DistributedPolicySet(
            js, self.topology, freshness_s=self.settings.policy_freshness_s
        )
        # Not waited for: registrations need no policy and the registry starts before the
        # policy service does; freezes are refused (UNAVAILABLE POLICY_STALE) until the set
        # arrives.
        self.distributed.start()
        return ControlPlaneAuthorization(
            self.distributed,
            ChainAuditor(self.audit),
            subject_claim=self.settings.human_subject_claim,
            groups_claim=self.settings.human_groups_claim,
        )

    async def _audit_refused_caller(self, method: str, caller: str, reason: str) -> None:
        """A caller the table refuses (no identity, or not an agent) is on the record."""
        if self.audit is None:
            return
        try:
            await self.audit.append(
                audit_pb2.AUDIT_KIND_REQUEST_REJECTED,
                outcome="refused",
                resource=method,
                details={"caller": caller or "unauthenticated", "reason": reason},
            )
        except Exception as exc:  # the call is refused either way
            log.error("refused_call_unaudited", method=method, error=repr(exc))

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.distributed is not None:
            await self.distributed.stop()
            self.distributed = None
        if self.audit is not None:
            await self.audit.close()
            self.audit = None
        if self.workload is not None:
            await self.workload.close()
            self.workload = None
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None
