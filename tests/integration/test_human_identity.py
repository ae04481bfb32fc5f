"""People at the front door (attack I6 of RELIABILITY.md): a real Envoy verifies every
external request's identity token (jwt_authn, the keys of a real OpenBao's identity token
issuer, fetched and pushed by the control plane), and what reaches the coordinator is
the verified person, never what the caller wrote.

The stack is the one of test_gateway.py, started once for this module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2

from tessera.runtime.principal import CLAIMS_HEADER, encode_claims
from tessera.v1 import agent_pb2, coordinator_pb2, coordinator_pb2_grpc
from tests.integration.harness import REPO
from tests.integration.people import OTHER_AUDIENCE_ROLE, SHORT_ROLE, claims
from tests.integration.test_gateway import (  # noqa: F401 (fixtures)
    Stack,
    descriptor_set,
    people,
    registry,
    request,
    risk_agent,
    routes_file,
    stack,
)

START = "/v1/workflows"


def key_id(token: str) -> str:
    """The ``kid`` of a token's header: which of the issuer's keys signed it."""
    head = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


def get(stack: Stack, token: str | None) -> int:  # noqa: F811
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return request(stack, "GET", "/v1/workflows/nope", headers=headers, as_user=None).status


async def test_requests_without_a_valid_token_get_401(stack: Stack) -> None:  # noqa: F811
    crowd = stack.people
    assert await asyncio.to_thread(get, stack, None) == 401
    assert await asyncio.to_thread(get, stack, "not-a-jwt") == 401
    assert await asyncio.to_thread(get, stack, crowd.forged("alice", ["approvers"])) == 401
    other = crowd.fresh_token("alice", role=OTHER_AUDIENCE_ROLE)
    assert claims(other)["aud"] == "someone-else"
    # Genuine, but minted for another service: Envoy's answer to a wrong audience is 403.
    assert await asyncio.to_thread(get, stack, other) == 403
    # The same person's real token is let in (404: the workflow does not exist).
    assert await asyncio.to_thread(get, stack, crowd.token("alice")) == 404


async def test_an_expired_token_is_refused(stack: Stack) -> None:  # noqa: F811
    short = stack.people.fresh_token("bob", role=SHORT_ROLE)
    assert await asyncio.to_thread(get, stack, short) == 404  # valid while it lasts
    expires = float(claims(short)["exp"])  # type: ignore[arg-type]
    # Until exp and the stack's 1 s of clock-skew leeway have passed.
    await asyncio.sleep(max(0.0, expires - time.time()) + 2.0)
    assert await asyncio.to_thread(get, stack, short) == 401


async def test_grpc_callers_without_a_token_get_unauthenticated(stack: Stack) -> None:  # noqa: F811
    async with stack.channel(None) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetWorkflow(
                coordinator_pb2.GetWorkflowRequest(name="workflows/x"), timeout=5
            )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_spoofed_identity_header_is_replaced_by_the_verified_one(
    stack: Stack,  # noqa: F811
    risk_agent: agent_pb2.AgentDescriptor,  # noqa: F811
) -> None:
    """Alice's real token plus a claims header naming the CEO: the workflow is started
    by alice, because Envoy drops the caller's header and forwards the token's claims."""
    spoofed = encode_claims({"preferred_username": "the-ceo", "groups": ["operators"]})
    async with stack.channel("alice") as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        inputs = struct_pb2.Struct()
        inputs.update({"customer": {"id": "7"}})
        started = await stub.StartWorkflow(
            coordinator_pb2.StartWorkflowRequest(
                request_id=uuid.uuid4().hex, goal="risk", inputs=inputs
            ),
            metadata=[(CLAIMS_HEADER, spoofed), ("x-tessera-subject", "the-ceo")],
            timeout=30,
        )
    assert started.workflow.started_by == "alice"


async def test_a_rotated_key_reaches_envoy(stack: Stack) -> None:  # noqa: F811
    """`tessera creds rotate humans` rotates the key at the issuer; the control plane
    pushes the new set, tokens signed with the new key verify (within its refresh
    interval, 0.5 s in this stack) and tokens signed before still do until they expire."""
    crowd = stack.people
    before = crowd.fresh_token("carol")
    command = ["rotate", "humans", "--addr", crowd.openbao.addr, "--no-audit"]
    rotated = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tessera.cli.creds", *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "VAULT_TOKEN": crowd.openbao.root_token, "COLUMNS": "200"},
    )
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "identity/oidc/key/tessera-humans: rotated" in rotated.stdout, rotated.stdout
    fresh = crowd.fresh_token("carol")
    assert key_id(fresh) != key_id(before)  # signed with the new key
    deadline = time.monotonic() + 10
    while (status := await asyncio.to_thread(get, stack, fresh)) != 404:
        assert status == 401 and time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(get, stack, before) == 404  # still valid
