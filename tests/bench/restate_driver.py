"""`python -m tests.bench.restate_driver --ingress URL --concurrency N --duration S`: N
concurrent clients against Restate's ingress, each running the supervisor workflow
(`restate_service.py`) as one request/response call, `POST /BenchSupervisor/<fresh id>/run`,
whose reply is the workflow's result, over and over (uvloop). Prints one JSON object like
the other drivers': completed workflows (right result) and their latencies inside the
measured window (after `--warmup` seconds)."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import httpx
import uvloop

from tests.bench.load import closed_loop, driver_parser
from tests.bench.restate_service import WORKFLOW

EXPECTED = {"answer": "DONE: BENCH"}
BODY = {"goal": "bench"}


async def one(client: httpx.AsyncClient) -> tuple[str, float]:
    began = time.perf_counter()
    try:
        reply = await client.post(f"/{WORKFLOW}/{uuid.uuid4().hex}/run", json=BODY)
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}", time.perf_counter() - began
    latency = time.perf_counter() - began
    if reply.status_code != 200:
        return f"http_{reply.status_code}", latency
    # Checked as the LangGraph driver checks its graph's result.
    return ("workflow_completed" if reply.json() == EXPECTED else "wrong_result"), latency


async def main(args: argparse.Namespace) -> dict[str, Any]:
    # One keep-alive HTTP/1.1 connection per client: plain request/response, no client
    # ever waits for another's connection.
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(base_url=args.ingress, limits=limits, timeout=60) as client:
        return await closed_loop(
            lambda _: one(client),
            concurrency=args.concurrency,
            warmup=args.warmup,
            duration=args.duration,
        )


if __name__ == "__main__":
    parser = driver_parser()
    parser.add_argument("--ingress", required=True)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
