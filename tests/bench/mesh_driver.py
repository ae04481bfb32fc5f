"""`python -m tests.bench.mesh_driver --coordinator ADDR --concurrency N --duration S`:
N concurrent clients against the coordinator, each starting the supervisor workflow (or,
with `--workload long`, workload.long_plan's 40 steps) with an explicit plan and following
it with WatchWorkflow to its terminal event, over and over. Prints one JSON object:
completed workflows and their latencies (start call to terminal event) inside the measured
window (after `--warmup` seconds)."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import grpc
import uvloop

from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc, planner_pb2
from tests.bench.load import closed_loop, driver_parser
from tests.bench.workload import long_plan, supervisor_plan

TERMINAL = {"workflow_completed", "workflow_failed", "workflow_cancelled"}


async def one(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, plan: planner_pb2.TaskGraph
) -> tuple[str, float]:
    began = time.perf_counter()
    started = await stub.StartWorkflow(
        coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=plan), timeout=60
    )
    call = stub.WatchWorkflow(
        coordinator_pb2.WatchWorkflowRequest(name=started.workflow.name), timeout=120
    )
    kind = "stream ended"
    try:
        async for item in call:
            kind = item.event.WhichOneof("kind") or ""
            if kind in TERMINAL:
                break
    finally:
        call.cancel()
    return kind, time.perf_counter() - began


async def main(args: argparse.Namespace) -> dict[str, Any]:
    plan = long_plan() if args.workload == "long" else supervisor_plan()
    # One channel per 16 clients: one HTTP/2 connection would serialize on its reader.
    channels = [
        grpc.aio.insecure_channel(args.coordinator)
        for _ in range(max(1, (args.concurrency + 15) // 16))
    ]
    stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(c) for c in channels]
    try:
        return await closed_loop(
            lambda i: one(stubs[i % len(stubs)], plan),
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=args.duration,
        )
    finally:
        for ch in channels:
            await ch.close()


if __name__ == "__main__":
    parser = driver_parser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--workload", choices=("supervisor", "long"), default="supervisor")
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
