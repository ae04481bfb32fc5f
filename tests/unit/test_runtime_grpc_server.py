"""GrpcServer behaviour seen from a real client over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TesseraError,
    Unauthenticated,
    error_details,
)
from tessera.runtime.grpc_server import GrpcServer

SERVICE = "tessera.test.v1.EchoService"
SECRET = "s3cr3t-db-password-value"


class Echo:
    """A tiny servicer built on the generic-handler API with bytes (de)serializers."""

    def __init__(self) -> None:
        self.hang_started = asyncio.Event()
        self.release = asyncio.Event()
        self.raise_on: dict[bytes, BaseException] = {}

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request in self.raise_on:
            raise self.raise_on[request]
        return request

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hang_started.set()
        await self.release.wait()
        return request

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"first"
        if request in self.raise_on:
            raise self.raise_on[request]
        yield b"second"

    async def hang_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"first"
        await self.release.wait()
        yield b"never"

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "HangStream": grpc.unary_stream_rpc_method_handler(self.hang_stream),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def start_echo(
    *,
    settings: ServiceSettings | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[GrpcServer, Echo]:
    echo = Echo()
    server = GrpcServer(
        name="echo",
        settings=settings or ServiceSettings(),
        register=[echo.register],
        service_names=[SERVICE],
        extra_interceptors=extra_interceptors,
    )
    await server.start()
    return server, echo


def unary(ch: grpc.aio.Channel, method: str = "Unary") -> Callable[..., Any]:
    return ch.unary_unary(f"/{SERVICE}/{method}")


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[GrpcServer, Echo]]:
    server, echo = await start_echo()
    yield server, echo
    echo.release.set()
    await server.stop(grace=0)


async def test_start_binds_a_free_port_and_serves(echo_server: tuple[GrpcServer, Echo]) -> None:
    server, _ = echo_server
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(server.address) as ch:
        assert await unary(ch)(b"hello", timeout=5) == b"hello"


async def test_health_serving_for_every_name_after_start(
    echo_server: tuple[GrpcServer, Echo],
) -> None:
    server, _ = echo_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_reports_not_serving_then_closes() -> None:
    server, echo = await start_echo()
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        # A call in flight when stop begins is allowed to finish within the grace period.
        in_flight = asyncio.ensure_future(unary(ch, "Hang")(b"inflight", timeout=10))
        await asyncio.wait_for(echo.hang_started.wait(), 5)
        stopping = asyncio.create_task(server.stop(grace=5))

        update = await watch.read()
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        echo.release.set()
        assert await in_flight == b"inflight"
        await stopping
        await asyncio.wait_for(server.wait_for_termination(), 5)

    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_the_services(echo_server: tuple[GrpcServer, Echo]) -> None:
    server, _ = echo_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (
            NotFound("workflow wf-1 not found", metadata={"workflow": "wf-1"}),
            "NOT_FOUND",
            "NOT_FOUND",
        ),
        (
            Unauthenticated("token expired", reason="TOKEN_EXPIRED"),
            "UNAUTHENTICATED",
            "TOKEN_EXPIRED",
        ),
    ],
)
async def test_domain_error_reaches_client_with_error_info(
    echo_server: tuple[GrpcServer, Echo], exc: TesseraError, code: str, reason: str
) -> None:
    server, echo = echo_server
    echo.raise_on[b"boom"] = exc
    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"boom", timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode[code]
    assert details.message == exc.message
    assert details.reason == reason
    assert details.domain == "tessera"
    assert dict(details.metadata) == exc.metadata


async def test_invalid_argument_carries_field_violations(
    echo_server: tuple[GrpcServer, Echo],
) -> None:
    server, echo = echo_server
    echo.raise_on[b"bad"] = InvalidArgument(
        "request is invalid",
        field_violations=[("goal", "must not be empty"), ("budget.tokens", "must be > 0")],
    )
    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"bad", timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_ARGUMENT"
    assert details.field_violations == (
        ("goal", "must not be empty"),
        ("budget.tokens", "must be > 0"),
    )


async def test_precondition_and_retry_details(echo_server: tuple[GrpcServer, Echo]) -> None:
    server, echo = echo_server
    echo.raise_on[b"pre"] = FailedPrecondition(
        "gate not pending",
        reason="GATE_NOT_PENDING",
        violations=[("STATE", "workflows/wf-1/gates/g1", "gate already approved")],
    )
    echo.raise_on[b"busy"] = ResourceExhausted("budget spent", retry_after_s=1.5)
    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as pre:
            await unary(ch)(b"pre", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await unary(ch)(b"busy", timeout=5)
    pre_details = error_details(pre.value)
    assert pre_details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert pre_details.reason == "GATE_NOT_PENDING"
    assert pre_details.precondition_violations == (
        ("STATE", "workflows/wf-1/gates/g1", "gate already approved"),
    )
    busy_details = error_details(busy.value)
    assert busy_details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert busy_details.retry_after_s == pytest.approx(1.5)


async def test_unexpected_exception_is_internal_without_leaking_text(
    echo_server: tuple[GrpcServer, Echo],
) -> None:
    server, echo = echo_server
    echo.raise_on[b"crash"] = RuntimeError(f"could not connect with password={SECRET}")
    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(ch)(b"crash", timeout=5)
    details = error_details(err.value)
    assert details.code == grpc.StatusCode.INTERNAL
    assert details.reason == "INTERNAL"
    assert details.message.startswith("internal error (ref ")
    assert details.metadata["ref"] in details.message
    everything = repr(err.value) + repr(err.value.trailing_metadata())
    assert SECRET not in everything
    assert "RuntimeError" not in everything


async def test_errors_in_streams_are_mapped_after_partial_output(
    echo_server: tuple[GrpcServer, Echo],
) -> None:
    server, echo = echo_server
    echo.raise_on[b"late"] = NotFound("gone midway")
    async with grpc.aio.insecure_channel(server.address) as ch:
        call = ch.unary_stream(f"/{SERVICE}/Stream")(b"late", timeout=5)
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert error_details(err.value).reason == "NOT_FOUND"


async def test_context_abort_is_not_turned_into_internal() -> None:
    async def aborting(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "page out of range")
        raise AssertionError("unreachable")

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(aborting)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Abort": handler}),)
        )

    server = GrpcServer(
        name="abort", settings=ServiceSettings(), register=[register], service_names=[SERVICE]
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "Abort")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert err.value.details() == "page out of range"
    finally:
        await server.stop(grace=0)


async def test_default_deadline_applies_when_caller_sets_none() -> None:
    server, _ = await start_echo(settings=ServiceSettings(default_deadline_s=0.2))
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "Hang")(b"x")  # no client deadline at all
        details = error_details(err.value)
        assert details.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert details.reason == "DEADLINE_EXCEEDED"
    finally:
        await server.stop(grace=0)


async def test_deadline_longer_than_cap_is_capped_for_streams_too() -> None:
    server, _ = await start_echo(settings=ServiceSettings(max_deadline_s=0.3))
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            call = ch.unary_stream(f"/{SERVICE}/HangStream")(b"x", timeout=60)
            assert await call.read() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
        assert error_details(err.value).code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(grace=0)


async def test_caller_deadline_within_cap_is_left_alone() -> None:
    server, echo = await start_echo(settings=ServiceSettings(default_deadline_s=0.05))
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            call = unary(ch, "Hang")(b"slow-ok", timeout=10)
            await asyncio.wait_for(echo.hang_started.wait(), 5)
            # Released well after the 0.05 s default: the caller's own deadline governs.
            await asyncio.sleep(0.2)
            echo.release.set()
            assert await call == b"slow-ok"
    finally:
        await server.stop(grace=0)


class _RejectAll(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        if handler_call_details.method.startswith(f"/{SERVICE}/"):
            raise Unauthenticated("missing token", reason="TOKEN_MISSING")
        return await continuation(handler_call_details)


async def test_extra_interceptor_errors_are_mapped() -> None:
    server, _ = await start_echo(extra_interceptors=[_RejectAll()])
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"x", timeout=5)
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        details = error_details(err.value)
        assert details.code == grpc.StatusCode.UNAUTHENTICATED
        assert details.reason == "TOKEN_MISSING"
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=0)


async def test_binding_a_taken_port_fails() -> None:
    first, _ = await start_echo()
    try:
        second = GrpcServer(
            name="dup",
            settings=ServiceSettings(listen=first.address),
            register=[],
            service_names=[],
        )
        with pytest.raises(OSError):
            await second.start()
    finally:
        await first.stop(grace=0)
