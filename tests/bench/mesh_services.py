"""`python -m tests.bench.mesh_services <addresses.json>`: the planner, the registry service
and the bench agent in one process (uvloop), registered on the NATS named by TESSERA_NATS_URL /
TESSERA_NAMESPACE; writes {"planner": ..., "agent": ...} to the file once serving, then
runs until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from services.planner.service import PlannerService
from services.planner.settings import PlannerSettings
from services.registry.app import RegistryApp
from services.registry.settings import RegistrySettings
from tessera.runtime.config import ServiceSettings
from tessera.runtime.grpc_server import run
from tessera.runtime.logging import configure_logging
from tests.bench.workload import agent


async def main() -> None:
    out = Path(sys.argv[1])
    common = ServiceSettings(listen="127.0.0.1:0")
    configure_logging("bench-services", common.log_level)
    planner = PlannerService(
        PlannerSettings(nats_url=common.nats_url, namespace=common.namespace, listen="127.0.0.1:0")
    )
    await planner.start()
    registry = RegistryApp(
        RegistrySettings(nats_url=common.nats_url, namespace=common.namespace, listen="127.0.0.1:0")
    )
    await registry.start()
    await agent.start(settings=common.model_copy(update={"registry_address": registry.address}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"planner": planner.address, "agent": agent.endpoint}))
    tmp.rename(out)
    try:
        await stop.wait()
    finally:
        await agent.stop(grace_s=0.5)
        await registry.stop()
        await planner.stop()


if __name__ == "__main__":
    run(main)
