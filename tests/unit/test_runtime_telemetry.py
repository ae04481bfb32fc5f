"""Trace context crosses NATS headers and gRPC hops."""

from __future__ import annotations

import grpc
from opentelemetry import trace

from tessera.runtime.config import ServiceSettings
from tessera.runtime.grpc_client import channel
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.telemetry import configure_tracing, extract_context, inject_headers


def test_configure_tracing_is_idempotent() -> None:
    first = configure_tracing("tests")
    assert configure_tracing("other", "console") is first


def test_headers_round_trip_the_current_span() -> None:
    configure_tracing("tests")
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("publish") as span:
        headers = inject_headers({"Nats-Msg-Id": "m-1"})
        sent = span.get_span_context()
    assert headers["Nats-Msg-Id"] == "m-1"
    assert headers["traceparent"].split("-")[1] == format(sent.trace_id, "032x")

    with tracer.start_as_current_span("consume", context=extract_context(headers)) as child:
        assert child.get_span_context().trace_id == sent.trace_id


def test_extract_without_headers_gives_no_parent() -> None:
    ctx = extract_context(None)
    assert not trace.get_current_span(ctx).get_span_context().is_valid


async def test_grpc_hop_continues_the_callers_trace() -> None:
    configure_tracing("tests")
    seen: list[int] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(trace.get_current_span().get_span_context().trace_id)
        return request

    def register(server: grpc.aio.Server) -> None:
        h = grpc.unary_unary_rpc_method_handler(handler)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.v1.T", {"M": h}),))

    server = GrpcServer(
        name="t", settings=ServiceSettings(), register=[register], service_names=["t.v1.T"]
    )
    await server.start()
    try:
        async with channel(server.address) as ch:
            with trace.get_tracer("tests").start_as_current_span("caller") as span:
                await ch.unary_unary("/t.v1.T/M")(b"x", timeout=5)
                caller_trace = span.get_span_context().trace_id
    finally:
        await server.stop(grace=0)
    assert seen == [caller_trace]
