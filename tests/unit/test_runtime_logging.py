"""JSON logs: one object per line, context and trace ids on every line, secrets never."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import structlog
from opentelemetry import trace

from tessera.runtime.config import ServiceSettings
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.logging import bind_context, clear_context, configure_logging
from tessera.runtime.telemetry import configure_tracing

SECRET = "hvs.CAESIJ-very-secret-value"


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    configure_logging("planner", "debug", stream=buffer)
    clear_context()
    yield buffer
    clear_context()
    configure_logging("tests", "info", stream=sys.stderr)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line]


def test_structlog_lines_are_json_with_service_level_and_utc_timestamp(
    logs: io.StringIO,
) -> None:
    structlog.get_logger("x").info("plan_created", steps=3)
    (line,) = lines(logs)
    assert line["event"] == "plan_created"
    assert line["steps"] == 3
    assert line["service"] == "planner"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")


def test_bound_context_appears_on_every_line_until_cleared(logs: io.StringIO) -> None:
    log = structlog.get_logger()
    bind_context(workflow_id="wf-1", task_id="t-7")
    log.info("one")
    logging.getLogger("grpc._cython").warning("two from stdlib")
    clear_context()
    log.info("three")
    first, second, third = lines(logs)
    for line in (first, second):
        assert (line["workflow_id"], line["task_id"]) == ("wf-1", "t-7")
    assert second["event"] == "two from stdlib"
    assert second["service"] == "planner"
    assert second["logger"] == "grpc._cython"
    assert "workflow_id" not in third


def test_secrets_are_redacted_at_any_depth(logs: io.StringIO) -> None:
    log = structlog.get_logger()
    log.info(
        "vault_login",
        token=SECRET,
        Client_Secret=SECRET,
        secret_id=SECRET,
        request={"headers": {"Authorization": f"Bearer {SECRET}"}, "path": "/v1/kv"},
        creds=[{"db_password": SECRET, "user": "svc"}],
        api_credential=SECRET,
    )
    structlog.get_logger().info("nested", outer={"x": {"refresh_token": SECRET}})
    output = logs.getvalue()
    assert SECRET not in output
    first, second = lines(logs)
    assert first["token"] == "[redacted]"
    assert first["Client_Secret"] == "[redacted]"
    assert first["request"]["headers"]["Authorization"] == "[redacted]"
    assert first["request"]["path"] == "/v1/kv"
    assert first["creds"] == [{"db_password": "[redacted]", "user": "svc"}]
    assert second["outer"]["x"]["refresh_token"] == "[redacted]"


def test_bound_secret_is_redacted_too(logs: io.StringIO) -> None:
    bind_context(vault_token=SECRET)
    structlog.get_logger().info("something")
    logging.getLogger("hvac").info("stdlib too")
    assert SECRET not in logs.getvalue()
    assert all(line["vault_token"] == "[redacted]" for line in lines(logs))


def test_trace_and_span_ids_while_a_span_is_active(logs: io.StringIO) -> None:
    configure_tracing("tests")
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("work") as span:
        structlog.get_logger().info("inside")
        ctx = span.get_span_context()
    structlog.get_logger().info("outside")
    inside, outside = lines(logs)
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in outside


def test_level_filters_lines() -> None:
    buffer = io.StringIO()
    try:
        configure_logging("planner", "warning", stream=buffer)
        structlog.get_logger().info("hidden")
        logging.getLogger("nats").info("hidden too")
        structlog.get_logger().warning("shown")
        assert [line["event"] for line in lines(buffer)] == ["shown"]
    finally:
        configure_logging("tests", "info", stream=sys.stderr)


async def test_unexpected_handler_error_is_logged_with_the_ref_the_client_sees(
    logs: io.StringIO,
) -> None:
    async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError(f"db said: password {SECRET} rejected")

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(crash)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.v1.S", {"Crash": handler}),)
        )

    server = GrpcServer(
        name="t", settings=ServiceSettings(), register=[register], service_names=["t.v1.S"]
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/t.v1.S/Crash")(b"", timeout=5)
    finally:
        await server.stop(grace=0)
    (logged,) = [line for line in lines(logs) if line["event"] == "rpc_unexpected_error"]
    assert logged["ref"] in (err.value.details() or "")
    assert logged["method"] == "/t.v1.S/Crash"
    assert "RuntimeError" in logged["exception"]  # the operator sees the full traceback
