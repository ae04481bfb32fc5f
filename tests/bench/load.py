"""The closed-loop load the asyncio drivers share: N clients, each running one workflow
after another; what ends inside the measured window (after the warmup) counts, and the
driver's own CPU is sampled over that window."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Run = Callable[[int], Awaitable[tuple[str, float]]]
"""One workflow by client ``i``: (its outcome, e.g. ``workflow_completed``, latency in s)."""


async def closed_loop(
    run: Run, *, concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    """Drive ``run`` from ``concurrency`` clients; the report every driver prints."""
    window_start = time.perf_counter() + warmup
    deadline = window_start + duration
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    cpu: dict[str, float] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        cpu["end"] = time.process_time()

    async def client(i: int) -> None:
        while time.perf_counter() < deadline:
            kind, latency = await run(i)
            end = time.perf_counter()
            if window_start <= end <= deadline:
                outcomes[kind] = outcomes.get(kind, 0) + 1
                if kind == "workflow_completed":
                    latencies.append(latency)

    await asyncio.gather(sample_cpu(), *(client(i) for i in range(concurrency)))
    return {
        "concurrency": concurrency,
        "window_s": duration,
        "completed": len(latencies),
        "outcomes": outcomes,
        "latencies_s": latencies,
        "client_cpu_s": cpu["end"] - cpu["start"],
    }


def driver_parser() -> argparse.ArgumentParser:
    """The arguments every driver takes (``--concurrency``, ``--duration``, ``--warmup``);
    each adds its own side's."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=1.0)
    return parser
