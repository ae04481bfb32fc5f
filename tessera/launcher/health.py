"""Health probes: HTTP for the infrastructure, grpc.health.v1 for the services."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import urllib.error
import urllib.request
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class Health(enum.Enum):
    """Health of one component as `tessera status` shows it."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DOWN = "DOWN"


def http_ok(url: str, *, timeout: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 (loopback only, no proxies)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def accepts(address: str, *, connect_s: float = 1.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` (closed again at once);
    True for an address without a port (nothing to try: the caller's probe decides).

    A cheap "is it listening yet" before a gRPC health probe: a service binds its port
    only once it has its certificate, just before it reports SERVING."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return True
    try:
        async with asyncio.timeout(connect_s):
            _reader, writer = await asyncio.open_connection(host.strip("[]") or "127.0.0.1", port)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def grpc_health(
    address: str,
    names: Sequence[str],
    *,
    rpc_timeout: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, str]] = (),
) -> Health:
    """SERVING if every name in ``names`` reports SERVING at ``address``.

    NOT_SERVING if the server answers but some name is not serving (or unknown), DOWN if
    the server cannot be reached within ``rpc_timeout`` seconds per check. ``credentials``
    (and the ``options`` that name the expected server) make the probe mTLS.
    """
    if credentials is None:
        probe = grpc.aio.insecure_channel(address)
    else:
        probe = grpc.aio.secure_channel(address, credentials, options=list(options))
    async with probe as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in names or [""]:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=name), timeout=rpc_timeout
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return Health.DOWN
                return Health.NOT_SERVING
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return Health.NOT_SERVING
    return Health.SERVING
