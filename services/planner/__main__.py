"""`python -m services.planner`: run the planner until SIGTERM/SIGINT.

A broken workflow template is a startup error: it is logged (file, field, problem) and
the process exits with status 2.
"""

import structlog

from services.planner.service import PlannerService
from services.planner.settings import PlannerSettings
from services.planner.templates import TemplateError
from tessera.runtime.grpc_server import run, serve
from tessera.runtime.logging import configure_logging
from tessera.runtime.telemetry import configure_tracing

log = structlog.get_logger("services.planner")


async def main() -> None:
    settings = PlannerSettings()
    configure_logging("planner", settings.log_level)
    configure_tracing("planner", settings.otel_exporter, settings.otel_endpoint)
    planner = PlannerService(settings)
    try:
        try:
            await planner.start()
        except TemplateError as exc:
            log.error("template_invalid", path=str(exc.path), field=exc.field, problem=exc.problem)
            raise SystemExit(2) from None
        assert planner.server is not None
        await serve(planner.server)
    finally:
        await planner.stop()


if __name__ == "__main__":
    run(main)
