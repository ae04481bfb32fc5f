"""`python -m services.gateway`: run the gateway control plane until SIGTERM."""

from services.gateway.app import GatewayControlPlane
from services.gateway.settings import GatewaySettings
from tessera.runtime.grpc_server import run, serve
from tessera.runtime.logging import configure_logging
from tessera.runtime.telemetry import configure_tracing


async def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    configure_tracing("gateway", settings.otel_exporter, settings.otel_endpoint)
    control_plane = GatewayControlPlane(settings)
    try:
        await control_plane.start()
        assert control_plane.server is not None
        await serve(control_plane.server)
    finally:
        await control_plane.stop()


if __name__ == "__main__":
    run(main)
