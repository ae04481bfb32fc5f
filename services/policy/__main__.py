"""`python -m services.policy`: run one policy service instance until SIGTERM."""

from services.policy.app import PolicyService
from services.policy.settings import PolicySettings
from tessera.runtime.grpc_server import run, serve
from tessera.runtime.logging import configure_logging
from tessera.runtime.telemetry import configure_tracing


async def main() -> None:
    settings = PolicySettings()
    configure_logging("policy", settings.log_level)
    configure_tracing("policy", settings.otel_exporter, settings.otel_endpoint)
    service = PolicyService(settings)
    try:
        await service.start()
        assert service.server is not None
        await serve(service.server)
    finally:
        await service.stop()


if __name__ == "__main__":
    run(main)
