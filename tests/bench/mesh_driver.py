"""`python -m tests.bench.mesh_driver --coordinator ADDR --concurrency N --duration S`:
N concurrent clients against the coordinator, each starting the supervisor workflow
(StartWorkflow with an explicit plan) and following it with WatchWorkflow to its terminal
event, over and over. Prints one JSON object: completed workflows and their latencies
(start call to terminal event) inside the measured window (after `--warmup` seconds)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import grpc
import uvloop

from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc, planner_pb2
from tests.bench.workload import supervisor_plan

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


async def main(args: argparse.Namespace) -> dict[str, object]:
    plan = supervisor_plan()
    # One channel per 16 clients: one HTTP/2 connection would serialize on its reader.
    channels = [
        grpc.aio.insecure_channel(args.coordinator)
        for _ in range(max(1, (args.concurrency + 15) // 16))
    ]
    stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(c) for c in channels]
    t0 = time.perf_counter()
    window_start = t0 + args.warmup
    deadline = window_start + args.duration
    latencies: list[float] = []
    finished_at: list[float] = []
    outcomes: dict[str, int] = {}

    cpu: dict[str, float] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        cpu["end"] = time.process_time()

    sampler = asyncio.create_task(sample_cpu())

    async def client(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < deadline:
            kind, latency = await one(stub, plan)
            end = time.perf_counter()
            if window_start <= end <= deadline:
                outcomes[kind] = outcomes.get(kind, 0) + 1
                if kind == "workflow_completed":
                    latencies.append(latency)
                    finished_at.append(end)

    await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    await sampler
    for ch in channels:
        await ch.close()
    return {
        "concurrency": args.concurrency,
        "window_s": args.duration,
        "completed": len(latencies),
        "outcomes": outcomes,
        "latencies_s": latencies,
        "client_cpu_s": cpu["end"] - cpu["start"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=1.0)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
