"""`python -m tests.bench.restate_service --port N`: the benchmark's supervisor workflow as a
Restate workflow, served over HTTP/2 cleartext (h2c, so the server talks the bidirectional
protocol, its default) by hypercorn on uvloop, bound to 127.0.0.1.

One invocation is one workflow (the driver keys each by a fresh id). Every step is a
journaled `ctx.run_typed`: its result is appended to the invocation's journal on the server
(Restate's default persistence kept) and acknowledged before the handler goes on, as
LangGraph commits a checkpoint after each node. Routing and step logic are workload.py's,
as the LangGraph graph runs them: supervisor -> worker -> supervisor -> synthesizer.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import restate
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.bench.workload import do_work, supervise, synthesize

WORKFLOW = "BenchSupervisor"
# The graph's loop bound, so a routing bug ends as a wrong result instead of spinning.
MAX_ROUNDS = 4

bench = restate.Workflow(WORKFLOW)


@bench.main()
async def run(ctx: restate.WorkflowContext, request: dict[str, Any]) -> dict[str, Any]:
    goal = str(request.get("goal", ""))
    work: str | None = None
    route = await ctx.run_typed("supervisor", supervise, restate.RunOptions(), work)
    for _ in range(MAX_ROUNDS):
        if route != "worker":
            break
        work = await ctx.run_typed("worker", do_work, restate.RunOptions(), goal)
        route = await ctx.run_typed("supervisor", supervise, restate.RunOptions(), work)
    return await ctx.run_typed("synthesizer", synthesize, restate.RunOptions(), work)


app = restate.app(services=[bench])


async def main(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    # Restate keeps one HTTP/2 connection open and multiplexes every invocation on it:
    # hypercorn's per-connection limits must not cap or recycle it (the SDK's own harness
    # sets the same).
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 2**31 - 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, config, mode="asgi", shutdown_trigger=stop.wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
