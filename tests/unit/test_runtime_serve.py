"""A service process: run() on uvloop, serve() until SIGTERM, graceful stop, on_stop."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import uvloop

from tessera.runtime.grpc_client import wait_for_serving
from tessera.runtime.grpc_server import run

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from tessera.runtime.config import ServiceSettings
    from tessera.runtime.grpc_server import GrpcServer, run, serve

    out = Path(sys.argv[1])

    async def main() -> None:
        server = GrpcServer(
            name="child", settings=ServiceSettings(), register=[], service_names=["c.v1.C"]
        )

        async def on_stop() -> None:
            (out / "stopped").write_text("ok")

        await server.start()
        def announce() -> None:
            (out / "loop").write_text(type(asyncio.get_running_loop()).__module__)
            (out / "address.tmp").write_text(server.address)
            (out / "address.tmp").rename(out / "address")

        # Runs once serve() is suspended, i.e. after it installed its signal handlers.
        asyncio.get_running_loop().call_soon(announce)
        await serve(server, on_stop=on_stop)

    run(main)
    """
)


def test_run_uses_uvloop() -> None:
    seen: list[type] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    run(main)
    assert seen == [uvloop.Loop]


async def test_sigterm_stops_the_service_gracefully(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, str(tmp_path))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        address_file = tmp_path / "address"
        while not address_file.exists():  # poll with a deadline for the child's port
            assert proc.returncode is None, "child exited early"
            assert loop.time() < deadline, "child never reported its address"
            await asyncio.sleep(0.02)
        await wait_for_serving(address_file.read_text(), "c.v1.C", timeout=10)
        assert (tmp_path / "loop").read_text().startswith("uvloop")

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0
        assert (tmp_path / "stopped").read_text() == "ok"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
