"""`python -m services.tool_proxy`: run one tool proxy replica until SIGTERM."""

from services.tool_proxy.app import ToolProxy
from services.tool_proxy.settings import ToolProxySettings
from tessera.runtime.grpc_server import run, serve
from tessera.runtime.logging import configure_logging
from tessera.runtime.telemetry import configure_tracing


async def main() -> None:
    settings = ToolProxySettings()
    configure_logging("tool-proxy", settings.log_level)
    configure_tracing("tool-proxy", settings.otel_exporter, settings.otel_endpoint)
    proxy = ToolProxy(settings)
    try:
        await proxy.start()
        assert proxy.server is not None
        await serve(proxy.server)
    finally:
        await proxy.stop()


if __name__ == "__main__":
    run(main)
