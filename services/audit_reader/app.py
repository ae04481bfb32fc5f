"""The audit reader as one object with start()/stop(): alone under `python -m
services.audit_reader`, or in one process with others for tests.

It reads the audit stream (all of it: a chain verifies from its first record) and the
public halves of the checkpoint signing keys, and writes nothing: its NATS user may not
publish to any chain but its own (which it never writes), its Vault policy reads public
keys only.
"""

from __future__ import annotations

import structlog
from nats.aio.client import Client

from services.audit_reader.service import AuditServicer, PublicKeyCache
from services.audit_reader.settings import AuditReaderSettings
from tessera.audit import AuditWriter, PublicKeys
from tessera.policy.control_plane import ChainAuditor, ControlPlaneAuthorization
from tessera.policy.distribution import DistributedPolicySet
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.v1 import audit_pb2, audit_pb2_grpc
from tessera.vault.audit_keys import TransitSigner, read_public_keys_as

log = structlog.get_logger(__name__)
SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
IDENTITY = "audit-reader"


class AuditReaderApp:
    def __init__(self, settings: AuditReaderSettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self._nc: Client | None = None
        self.server: GrpcServer | None = None
        self.workload: Workload | None = None
        self.distributed: DistributedPolicySet | None = None
        self.audit: AuditWriter | None = None

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("audit reader not started")
        return self.server.address

    async def start(self) -> str:
        within_s = self.settings.startup_timeout_s
        self.workload = await Workload.start(self.settings)
        self._nc = await connect(
            self.settings.nats_url,
            name="audit-reader",
            initial_timeout_s=within_s,
            **self.workload.nats_options(self.settings),
        )
        js = self._nc.jetstream()
        await declare(
            js,
            self.topology,
            replicas=self.settings.jetstream_replicas,
            within_s=within_s,
            leaders_of=streams_used(IDENTITY, self.topology),
        )
        vault = self.workload.vault
        read_keys = None
        if vault is not None:

            async def read_keys() -> PublicKeys:
                return await read_public_keys_as(vault)

        self.audit = AuditWriter(
            js, self.topology, writer=self.settings.instance_id, actor=IDENTITY
        )
        await self.audit.start()
        if vault is not None:  # its refusals' chain, checkpoints signed with its own key
            self.audit.attach_signer(TransitSigner.for_client(vault))
        authz = ControlPlaneAuthorization(None, None)
        if self.workload.certificate is not None:
            self.distributed = DistributedPolicySet(
                js, self.topology, freshness_s=self.settings.policy_freshness_s
            )
            self.distributed.start()
            # A refused read is on the record; an allowed one is not (it changes nothing).
            authz = ControlPlaneAuthorization(
                self.distributed,
                ChainAuditor(self.audit),
                subject_claim=self.settings.human_subject_claim,
                groups_claim=self.settings.human_groups_claim,
            )
        else:
            log.warning("audit_reads_unauthorized", reason="plaintext debug audit reader")
        servicer = AuditServicer(
            js,
            self.topology,
            PublicKeyCache(read_keys, self.settings.keys_ttl_s),
            authz,
            read_timeout_s=self.settings.read_timeout_s,
        )
        self.server = GrpcServer(
            name="audit-reader",
            settings=self.settings,
            register=[lambda s: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, s)],
            service_names=[SERVICE_NAME],
            identity=self.workload.certificate,
        )
        await self.server.start()
        log.info("audit_reader_started", address=self.server.address)
        return self.server.address

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
