"""Client channel behaviour: retries, default deadline, readiness probe."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import Unavailable, error_details
from tessera.runtime.grpc_client import channel, wait_for_serving
from tessera.runtime.grpc_server import GrpcServer

SERVICE = "tessera.test.v1.FlakyService"


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.hang_started = asyncio.Event()

    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable("warming up", retry_after_s=0.01)
        return b"ok"

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hang_started.set()
        await asyncio.Event().wait()
        return b""

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(self.call),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def start(flaky: Flaky) -> GrpcServer:
    server = GrpcServer(
        name="flaky",
        settings=ServiceSettings(),
        register=[flaky.register],
        service_names=[SERVICE],
    )
    await server.start()
    return server


@pytest.mark.parametrize(("failures", "ok"), [(2, True), (5, False)])
async def test_unavailable_is_retried_up_to_max_attempts(failures: int, ok: bool) -> None:
    flaky = Flaky(failures)
    server = await start(flaky)
    try:
        async with channel(server.address, service="test", max_attempts=3) as ch:
            method = ch.unary_unary(f"/{SERVICE}/Call")
            if ok:
                assert await method(b"", timeout=5) == b"ok"
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await method(b"", timeout=5)
                assert error_details(err.value).code == grpc.StatusCode.UNAVAILABLE
        assert flaky.calls == 3  # two failures then success, or stopped at the bound
    finally:
        await server.stop(grace=0)


async def test_max_attempts_one_disables_retries() -> None:
    flaky = Flaky(failures=1)
    server = await start(flaky)
    try:
        async with channel(server.address, max_attempts=1) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ch.unary_unary(f"/{SERVICE}/Call")(b"", timeout=5)
        assert flaky.calls == 1
    finally:
        await server.stop(grace=0)


async def test_client_default_deadline_applies_when_caller_sets_none() -> None:
    flaky = Flaky(failures=0)
    server = await start(flaky)
    try:
        async with channel(server.address, default_timeout_s=0.2) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(f"/{SERVICE}/Hang")(b"")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert flaky.hang_started.is_set()
    finally:
        await server.stop(grace=0)


async def test_wait_for_serving_returns_once_the_server_is_up() -> None:
    flaky = Flaky(failures=0)
    server = await start(flaky)
    try:
        await wait_for_serving(server.address, SERVICE, timeout=5)
        await wait_for_serving(server.address, timeout=5)
    finally:
        await server.stop(grace=0)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_wait_for_serving_times_out_with_a_clear_message() -> None:
    target = f"127.0.0.1:{_unused_port()}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=f"{target}.*not SERVING after 0.3s"):
        await wait_for_serving(target, "x.Service", timeout=0.3)
    assert loop.time() - started < 2.0


async def test_wait_for_serving_waits_for_a_late_server() -> None:
    port = _unused_port()
    flaky = Flaky(failures=0)
    server = GrpcServer(
        name="late",
        settings=ServiceSettings(listen=f"127.0.0.1:{port}"),
        register=[flaky.register],
        service_names=[SERVICE],
    )
    waiter = asyncio.create_task(wait_for_serving(f"127.0.0.1:{port}", SERVICE, timeout=10))
    await asyncio.sleep(0)  # let the probe fail at least once against a closed port
    await server.start()
    try:
        await waiter
    finally:
        await server.stop(grace=0)


async def test_channel_metadata_goes_with_unary_and_streaming_calls() -> None:
    """A person's token must reach the gateway on WatchWorkflow (a server stream) as on
    every unary call."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    seen: dict[str, list[str]] = {}

    class Health(health_pb2_grpc.HealthServicer):
        async def Check(self, request: object, context: grpc.aio.ServicerContext) -> object:  # type: ignore[override]
            seen["unary"] = [k for k, _ in context.invocation_metadata() or ()]
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        async def Watch(self, request: object, context: grpc.aio.ServicerContext):  # type: ignore[override]
            seen["stream"] = [k for k, _ in context.invocation_metadata() or ()]
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ch = channel(f"127.0.0.1:{port}", metadata=[("authorization", "Bearer t")])
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        await stub.Check(health_pb2.HealthCheckRequest())
        async for _ in stub.Watch(health_pb2.HealthCheckRequest(), timeout=5):
            break
    finally:
        await ch.close()
        await server.stop(0)
    assert "authorization" in seen["unary"]
    assert "authorization" in seen["stream"]
