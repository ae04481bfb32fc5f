"""The console service as one object with start()/stop(): alone under `python -m
services.console`, or in one process with others for tests.

It holds no state and no credentials of its own beyond its workload certificate: files
come from its assets folder, logins are the issuer's (OpenBao's userpass and identity
tokens), sessions live in the browser's cookie. It needs no NATS.
"""

from __future__ import annotations

import structlog

from services.console.assets import Assets
from services.console.service import ConsoleServicer
from services.console.settings import ConsoleSettings
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.v1 import console_pb2, console_pb2_grpc

log = structlog.get_logger(__name__)
SERVICE_NAME = console_pb2.DESCRIPTOR.services_by_name["ConsoleService"].full_name


class ConsoleApp:
    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.server: GrpcServer | None = None
        self.workload: Workload | None = None

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
        servicer = ConsoleServicer(self.settings, assets)
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
        if self.workload is not None:
            await self.workload.close()
            self.workload = None
