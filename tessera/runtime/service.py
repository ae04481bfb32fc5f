"""The entry point every service's `__main__` shares: logging, tracing, start, serve until
SIGTERM (graceful), stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tessera.runtime.config import CommonSettings
from tessera.runtime.grpc_server import GrpcServer, run, serve
from tessera.runtime.logging import configure_logging
from tessera.runtime.telemetry import configure_tracing


class Service(Protocol):
    """What `run_service` needs of a service object."""

    @property
    def server(self) -> GrpcServer | None: ...

    async def start(self) -> str: ...

    async def stop(self) -> None: ...


def run_service(name: str, settings: CommonSettings, build: Callable[[], Service]) -> None:
    """Run the service `build()` makes under uvloop until SIGTERM/SIGINT."""

    async def main() -> None:
        configure_logging(name, settings.log_level)
        configure_tracing(name, settings.otel_exporter, settings.otel_endpoint)
        service = build()
        try:
            await service.start()
            if service.server is None:
                raise RuntimeError(f"{name}: start() returned without a gRPC server")
            await serve(service.server)
        finally:
            await service.stop()

    run(main)
