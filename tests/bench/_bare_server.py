"""The start-up benchmark's baseline: the least a Python gRPC service does before SERVING.

`python -m tests.bench._bare_server 127.0.0.1:PORT`: grpc.aio plus the standard health
service, nothing else (no settings, logging, tracing, NATS or Vault), serving until killed.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer


async def main(listen: str) -> None:
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
