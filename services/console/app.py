"""The console service as one object with start()/stop(): alone under `python -m
services.console`, or in one process with others for tests.

It holds no state and no credentials of its own beyond its workload certificate: files
come from its assets folder, logins are the issuer's (OpenBao's userpass and identity
tokens), sessions live in the browser's cookie. Its NATS user writes one thing, its own
audit chain: every refused login is on the record.
"""

from __future__ import annotations

import structlog
from nats.aio.client import Client

from services.console.assets import Assets
from services.console.service import ConsoleServicer
from services.console.settings import ConsoleSettings
from tessera.audit import AuditWriter
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.v1 import console_pb2, console_pb2_grpc
from tessera.vault.audit_keys import TransitSigner

log = structlog.get_logger(__name__)
SERVICE_NAME = console_pb2.DESCRIPTOR.services_by_name["ConsoleService"].full_name
IDENTITY = "console"


class ConsoleApp:
    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.server: GrpcServer | None = None
        self.workload: Workload | None = None
        self.audit: AuditWriter | None = None
        self._nc: Client | None = None

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("console service not started")
        return self.server.address

    async def start(self) -> str:
        assets = Assets.load(self.settings.assets_dir)
        if not assets.get("index.html"):
            log.warning("console_assets_missing", folder=str(self.settings.assets_dir))
        self.workload = await Workload.start(self.settings)
        within_s = self.settings.startup_timeout_s
        self._nc = await connect(
            self.settings.nats_url,
            name=self.settings.instance_id,
            initial_timeout_s=within_s,
            **self.workload.nats_options(self.settings),
        )
        js = self._nc.jetstream()
        topology = Topology(self.settings.namespace)
        await declare(
            js,
            topology,
            replicas=self.settings.jetstream_replicas,
            within_s=within_s,
            leaders_of=streams_used(IDENTITY, topology),
        )
        self.audit = AuditWriter(
            js,
            topology,
            writer=self.settings.instance_id,
            actor=IDENTITY,
            publish_timeout_s=self.settings.audit_timeout_s,
        )
        await self.audit.start()
        if self.workload.vault is not None:
            self.audit.attach_signer(TransitSigner.for_client(self.workload.vault))
        servicer = ConsoleServicer(self.settings, assets, self.audit)
        self.server = GrpcServer(
            name="console",
            settings=self.settings,
            register=[lambda s: console_pb2_grpc.add_ConsoleServiceServicer_to_server(servicer, s)],
            service_names=[SERVICE_NAME],
            identity=self.workload.certificate,
        )
        await self.server.start()
        log.info("console_started", address=self.server.address, assets=len(assets))
        return self.server.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.audit is not None:
            await self.audit.close()
            self.audit = None
        if self.workload is not None:
            await self.workload.close()
            self.workload = None
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None
