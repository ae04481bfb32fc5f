"""`python -m services.coordinator`: run one coordinator replica until SIGTERM."""

from services.coordinator.app import Coordinator
from services.coordinator.settings import CoordinatorSettings
from tessera.runtime.grpc_server import run, serve
from tessera.runtime.logging import configure_logging
from tessera.runtime.telemetry import configure_tracing


async def main() -> None:
    settings = CoordinatorSettings()
    configure_logging("coordinator", settings.log_level)
    configure_tracing("coordinator", settings.otel_exporter, settings.otel_endpoint)
    coordinator = Coordinator(settings)
    try:
        await coordinator.start()
        assert coordinator.server is not None
        await serve(coordinator.server)
    finally:
        await coordinator.stop()


if __name__ == "__main__":
    run(main)
