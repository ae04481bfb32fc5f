"""Requests are decoded by our code: garbage and unknown fields are INVALID_ARGUMENT with
details, never grpcio's INTERNAL, and the handler never runs. The seed corpus below is
replayed on every run; hypothesis adds random bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import error_details
from tessera.runtime.grpc_server import GrpcServer
from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc

CALLS: list[str] = []

SEED_CORPUS = [
    b"\xff\xff\xff",  # corrupt wire format
    b"\x0a\x02\xff\xfe",  # field 1 (string) with invalid UTF-8
    b"\x0a\x05wor",  # a string shorter than its length prefix
    b"\x08\x01",  # field 1 sent as varint: wrong wire type for a string
    b"\x98\x06\x01",  # unknown field 99
    b"\x0a",  # length prefix missing
]


class Echo(coordinator_pb2_grpc.CoordinatorServiceServicer):
    async def GetWorkflow(self, request, context):  # type: ignore[no-untyped-def]
        CALLS.append(request.name)
        return coordinator_pb2.GetWorkflowResponse(
            workflow=coordinator_pb2.Workflow(name=request.name)
        )


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer(
        name="decode-test",
        settings=ServiceSettings(listen="127.0.0.1:0"),
        register=[
            lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(Echo(), s)
        ],
        service_names=["tessera.v1.CoordinatorService"],
    )
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch
    await server.stop(0)


def raw_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        "/tessera.v1.CoordinatorService/GetWorkflow",
        request_serializer=None,
        response_deserializer=None,
    )


async def outcome(channel: grpc.aio.Channel, payload: bytes) -> grpc.StatusCode:
    try:
        await raw_call(channel)(payload, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_valid_requests_still_reach_the_handler(channel: grpc.aio.Channel) -> None:
    payload = coordinator_pb2.GetWorkflowRequest(name="workflows/w1").SerializeToString()
    reply = coordinator_pb2.GetWorkflowResponse.FromString(
        await raw_call(channel)(payload, timeout=5)
    )
    assert reply.workflow.name == "workflows/w1"


@pytest.mark.parametrize("payload", SEED_CORPUS)
async def test_seed_corpus_is_refused_precisely(channel: grpc.aio.Channel, payload: bytes) -> None:
    CALLS.clear()
    code = await outcome(channel, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not CALLS


async def test_unknown_fields_are_named(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw_call(channel)(b"\x98\x06\x01", timeout=5)
    details = error_details(raised.value)
    assert details.reason == "UNKNOWN_FIELDS"
    assert details.field_violations == (("#99", "unknown field number"),)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=64))
async def test_random_bytes_never_answer_internal(
    channel: grpc.aio.Channel, payload: bytes
) -> None:
    code = await outcome(channel, payload)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
