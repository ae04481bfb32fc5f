"""HTTP/JSON through the gateway, as a team without gRPC calls the mesh: Envoy's gRPC-JSON
transcoder in front of the real coordinator (and planner), plus the edge limits.

The stack (coordinator, planner, control plane, Envoy) is the one of test_gateway.py,
started once for this module.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import grpc

from tessera.v1 import agent_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.integration.test_gateway import (  # noqa: F401 (fixtures)
    BURST,
    Reply,
    Stack,
    descriptor_set,
    people,
    registry,
    request,
    risk_agent,
    routes_file,
    stack,
)

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


async def call(
    gateway: Stack,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    as_user: str | None = "tester",
) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    return await asyncio.to_thread(request, gateway, method, path, data, headers, as_user=as_user)


async def test_start_read_list_and_watch_a_workflow_over_http(
    stack: Stack,  # noqa: F811
    risk_agent: agent_pb2.AgentDescriptor,  # noqa: F811
) -> None:
    started = await call(
        stack,
        "POST",
        "/v1/workflows",
        {
            "requestId": "http-1",
            "goal": "assess the credit and fraud risk of customer 7",
            "inputs": {"customer": {"id": "7"}},
        },
    )
    assert started.status == 200, started.body
    assert started.headers["content-type"] == "application/json"
    workflow = started.json()["workflow"]
    name = workflow["name"]
    assert name.startswith("workflows/")
    assert workflow["requestId"] == "http-1"
    assert workflow["plan"]["template"] == "risk"

    again = await call(stack, "POST", "/v1/workflows", {"requestId": "http-1", "goal": "x"})
    assert again.status == 200 and again.json()["workflow"]["name"] == name  # idempotent

    read = await call(stack, "GET", f"/v1/{name}")
    assert read.status == 200
    assert read.json()["workflow"]["name"] == name

    listed = await call(stack, "GET", "/v1/workflows?pageSize=10")
    assert listed.status == 200
    assert [w["name"] for w in listed.json()["workflows"]] == [name]

    # A server stream comes back as newline-delimited JSON, one message per line, as
    # the events happen (this workflow never advances: no workers run).
    host, port = stack.host_port

    def first_event() -> dict[str, object]:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", f"/v1/{name}:watch", headers=dict(stack.bearer("tester")))
            response = conn.getresponse()
            assert response.status == 200
            return dict(json.loads(response.readline()))
        finally:
            conn.close()

    event = await asyncio.to_thread(first_event)
    assert "workflowStarted" in event["event"]  # type: ignore[operator]


async def test_errors_are_json_google_rpc_status_with_details(stack: Stack) -> None:  # noqa: F811
    missing = await call(stack, "GET", "/v1/workflows/no-such-workflow")
    assert missing.status == 404
    status = missing.json()
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert status["message"]
    assert any(d["@type"] == ERROR_INFO and d["domain"] == "tessera" for d in status["details"])

    invalid = await call(stack, "POST", "/v1/workflows", {"goal": "no request id"})
    assert invalid.status == 400
    assert invalid.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    undecided = await call(
        stack,
        "POST",
        "/v1/workflows/no-such-workflow/gates/g1:decide",
        {"decision": "GATE_DECISION_APPROVE", "decidedBy": "alice"},
    )
    assert undecided.status in (400, 404), undecided.body  # FAILED_PRECONDITION / NOT_FOUND
    assert undecided.json()["details"]

    unknown_field = await call(stack, "GET", "/v1/workflows?noSuchParameter=1")
    assert unknown_field.status == 400


async def test_oversized_requests_are_refused_with_413(stack: Stack) -> None:  # noqa: F811
    huge = {"requestId": "big", "goal": "x" * (5 * 1024 * 1024)}
    refused = await call(stack, "POST", "/v1/workflows", huge)
    assert refused.status == 413


async def test_each_person_has_their_own_rate_limit(stack: Stack) -> None:  # noqa: F811
    """The module's routes.yaml gives each verified person a burst of BURST, no refill;
    the bucket follows the token's subject, never a header the caller picks."""
    statuses = [
        (
            await call(
                stack, "GET", "/v1/workflows/x", as_user="alice", headers={"x-tessera-subject": "z"}
            )
        ).status
        for _ in range(BURST + 1)
    ]
    assert statuses == [404] * BURST + [429]
    other = await call(stack, "GET", "/v1/workflows/x", as_user="bob")
    assert other.status == 404  # bob's bucket is his own
    assert (await call(stack, "GET", "/healthz", as_user="alice")).status == 200

    # gRPC callers are limited the same way and told RESOURCE_EXHAUSTED.
    async with stack.channel("carol") as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        codes = []
        for _ in range(BURST + 1):
            try:
                await stub.GetWorkflow(
                    coordinator_pb2.GetWorkflowRequest(name="workflows/x"),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    assert codes == [grpc.StatusCode.NOT_FOUND] * BURST + [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_healthz_answers_200_while_the_coordinator_serves(stack: Stack) -> None:  # noqa: F811
    deadline = time.monotonic() + 5
    while (reply := await call(stack, "GET", "/healthz")).status != 200:
        assert time.monotonic() < deadline, reply
        await asyncio.sleep(0.1)
