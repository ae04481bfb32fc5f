"""The A2A face, driven by the a2a-sdk's own client (an implementation none of us wrote)
through Envoy, against a mesh brought up by `tessera up`.

- Discovery: each template's card is public, signed with the card key, and checks with
  the key set its ``jku`` names (the SDK's verifier); a changed card does not.
- A gated workflow over the gRPC binding: the stream ends at input-required naming the
  AML gate; a compliance officer decides it in Tessera; a resubscription follows the task
  to completed with the workflow's result as its artifact.
- Blocking SendMessage, retry with the same message id, GetTask, ListTasks, CancelTask,
  and the refusals: no token, a person Cedar does not let start or read, an unknown
  template, a follow-up message, push notifications.
- A2A's HTTP+JSON routes (the transcoder, from the a2a-sdk's a2a.proto rules), unary.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.auth.credentials import CredentialService
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.client.card_resolver import A2ACardResolver
from a2a.client.client import Client
from a2a.client.transports.rest import RestTransport
from a2a.client.transports.tenant_decorator import TenantTransportDecorator
from a2a.types import a2a_pb2, a2a_pb2_grpc
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import (
    A2AError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from a2a.utils.signing import InvalidSignaturesError, create_signature_verifier
from google.protobuf import struct_pb2
from jwt import PyJWK

from tessera.cli.login import ensure_login
from tessera.runtime.grpc_client import metadata_interceptors
from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.integration.mesh_cli import gateway_address, mesh_up

TS = a2a_pb2.TaskState
HIGH_RISK_LOAN = {"application": {"applicant": "ACME", "amount": 250000, "country": "XX"}}
LOW_RISK_LOAN = {"application": {"applicant": "Jane Doe", "amount": 5000, "country": "DE"}}
CALL_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mesh_up(tmp_path_factory.mktemp("a2a-mesh")) as data_dir:
        yield data_dir


@pytest.fixture(scope="module")
def gateway(mesh_dir: Path) -> str:
    return gateway_address(mesh_dir)


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


class Token(CredentialService):
    """One person's identity token for the card's `bearer` scheme."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(self, security_scheme_name: str, context: Any) -> str | None:
        return self.token if security_scheme_name == "bearer" else None


def verifier(gateway: str) -> Any:
    def key(kid: str | None, jku: str | None) -> PyJWK:
        assert jku == f"http://{gateway}/a2a/.well-known/jwks.json"
        status, jwks = get_json(jku)
        assert status == 200
        return PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid))

    return create_signature_verifier(key, ["EdDSA"])


async def card(gateway: str, template: str) -> a2a_pb2.AgentCard:
    async with httpx.AsyncClient(timeout=10) as http:
        resolver = A2ACardResolver(http, f"http://{gateway}/a2a/{template}")
        return await resolver.get_agent_card(signature_verifier=verifier(gateway))


async def client_for(
    gateway: str,
    mesh_dir: Path,
    user: str | None,
    template: str,
    binding: str = TransportProtocol.GRPC,
    *,
    streaming: bool = True,
) -> Client:
    """The SDK's client from the verified card; ``streaming=False``: blocking calls."""
    config = ClientConfig(
        streaming=streaming,
        supported_protocol_bindings=[binding],
        grpc_channel_factory=lambda target: grpc.aio.insecure_channel(target),
        httpx_client=httpx.AsyncClient(timeout=CALL_TIMEOUT_S),
    )
    interceptors = [AuthInterceptor(Token(ensure_login(mesh_dir, user).token))] if user else []
    return ClientFactory(config).create(await card(gateway, template), interceptors=interceptors)


def message(inputs: dict[str, Any], message_id: str | None = None) -> a2a_pb2.SendMessageRequest:
    data = struct_pb2.Value()
    data.struct_value.update(inputs)
    return a2a_pb2.SendMessageRequest(
        message=a2a_pb2.Message(
            message_id=message_id or uuid.uuid4().hex,
            role=a2a_pb2.Role.ROLE_USER,
            parts=[a2a_pb2.Part(data=data)],
        )
    )


def states(responses: list[a2a_pb2.StreamResponse]) -> list[int]:
    out = []
    for r in responses:
        if r.HasField("task"):
            out.append(r.task.status.state)
        elif r.HasField("status_update"):
            out.append(r.status_update.status.state)
    return out


async def collect(stream: AsyncIterator[a2a_pb2.StreamResponse]) -> list[a2a_pb2.StreamResponse]:
    return [r async for r in stream]


async def approve(gateway: str, mesh_dir: Path, gate: str, user: str = "compliance") -> None:
    bearer = [("authorization", f"Bearer {ensure_login(mesh_dir, user).token}")]
    async with grpc.aio.insecure_channel(
        gateway, interceptors=metadata_interceptors(bearer)
    ) as channel:
        await coordinator_pb2_grpc.CoordinatorServiceStub(channel).DecideGate(
            coordinator_pb2.DecideGateRequest(
                name=gate, decision=coordinator_pb2.GATE_DECISION_APPROVE, comment="AML ok"
            ),
            timeout=30,
        )


async def test_cards_are_public_signed_and_name_the_front_door(gateway: str) -> None:
    loan = await card(gateway, "loan")  # verified by the SDK's verifier, or it raises
    assert loan.name == "tessera-loan" and loan.capabilities.streaming
    assert not loan.capabilities.push_notifications
    bindings = {(i.protocol_binding, i.url, i.tenant) for i in loan.supported_interfaces}
    assert bindings == {(TransportProtocol.GRPC, gateway, "loan")}
    scheme = loan.security_schemes["bearer"].http_auth_security_scheme
    assert (scheme.scheme, scheme.bearer_format) == ("Bearer", "JWT")
    assert [s.id for s in loan.skills] == ["loan"]
    assert "application (object, required)" in loan.skills[0].description

    tampered = a2a_pb2.AgentCard()
    tampered.CopyFrom(loan)
    tampered.supported_interfaces[0].url = "evil.example:443"
    with pytest.raises(InvalidSignaturesError):
        verifier(gateway)(tampered)

    status, _ = get_json(f"http://{gateway}/a2a/nope/.well-known/agent-card.json")
    assert status == 404


async def test_a_gated_loan_waits_for_a_person_then_completes(gateway: str, mesh_dir: Path) -> None:
    client = await client_for(gateway, mesh_dir, "requester", "loan")
    async with client:
        streamed = await collect(client.send_message(message(HIGH_RISK_LOAN)))
        assert streamed[0].HasField("task")
        task_id = streamed[0].task.id
        seen = states(streamed)
        assert seen[-1] == TS.TASK_STATE_INPUT_REQUIRED, seen
        assert TS.TASK_STATE_COMPLETED not in seen
        waiting = streamed[-1].status_update
        asks = waiting.status.message.parts[0].text
        assert "compliance-approval" in asks and "decided in Tessera" in asks
        [gate] = waiting.metadata["pendingGates"]
        assert gate == f"workflows/{task_id}/gates/compliance-approval"

        # A follow-up message cannot decide it: a person with the authority does.
        follow_up = message({"approve": True})
        follow_up.message.task_id = task_id
        with pytest.raises(UnsupportedOperationError, match="decided in Tessera"):
            await collect(client.send_message(follow_up))
        still = await client.get_task(a2a_pb2.GetTaskRequest(id=task_id))
        assert still.status.state == TS.TASK_STATE_INPUT_REQUIRED

        # Subscribed first (the snapshot arrives), then decided: the stream hears it.
        subscription = client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=task_id))
        snapshot = await anext(subscription)
        assert snapshot.task.status.state == TS.TASK_STATE_INPUT_REQUIRED
        await approve(gateway, mesh_dir, gate)
        followed = await collect(subscription)
        assert states(followed)[-1] == TS.TASK_STATE_COMPLETED, states(followed)
        artifacts = [r.artifact_update.artifact for r in followed if r.HasField("artifact_update")]
        assert [a.artifact_id for a in artifacts] == ["result"]

        done = await client.get_task(a2a_pb2.GetTaskRequest(id=task_id))
        assert done.status.state == TS.TASK_STATE_COMPLETED
        assert done.metadata["startedBy"] == "requester"  # the verified person, by name
        result = done.artifacts[0].parts[0].data.struct_value
        assert result == artifacts[0].parts[0].data.struct_value and len(result.fields) > 0


async def test_blocking_send_retry_list_and_cancel(gateway: str, mesh_dir: Path) -> None:
    requester = await client_for(gateway, mesh_dir, "requester", "loan", streaming=False)
    async with requester:
        request = message(HIGH_RISK_LOAN)
        [first] = await collect(requester.send_message(request))
        assert first.task.status.state == TS.TASK_STATE_INPUT_REQUIRED  # it waited, then parked
        [again] = await collect(
            requester.send_message(message(HIGH_RISK_LOAN, request.message.message_id))
        )
        assert again.task.id == first.task.id  # a retried message is the same workflow

        listed = await requester.list_tasks(
            a2a_pb2.ListTasksRequest(status=TS.TASK_STATE_INPUT_REQUIRED, page_size=50)
        )
        assert first.task.id in [t.id for t in listed.tasks]

        cancelled = await requester.cancel_task(a2a_pb2.CancelTaskRequest(id=first.task.id))
        assert cancelled.status.state in (TS.TASK_STATE_CANCELED, TS.TASK_STATE_WORKING)
        final = await requester.get_task(a2a_pb2.GetTaskRequest(id=first.task.id))
        assert final.status.state == TS.TASK_STATE_CANCELED
        with pytest.raises(TaskNotCancelableError, match="already ended"):
            await requester.cancel_task(a2a_pb2.CancelTaskRequest(id=first.task.id))

        [low] = await collect(requester.send_message(message(LOW_RISK_LOAN)))
        assert low.task.status.state == TS.TASK_STATE_COMPLETED
        assert low.task.artifacts[0].artifact_id == "result"

        with pytest.raises(TaskNotFoundError):
            await requester.get_task(a2a_pb2.GetTaskRequest(id=uuid.uuid4().hex[:20]))
        with pytest.raises(PushNotificationNotSupportedError):
            await requester.create_task_push_notification_config(
                a2a_pb2.TaskPushNotificationConfig(task_id=low.task.id, url="http://127.0.0.1:9")
            )

    # finance may neither start a loan nor read the requester's (Cedar, as for any API).
    finance = await client_for(gateway, mesh_dir, "finance", "loan", streaming=False)
    async with finance:
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            await collect(finance.send_message(message(LOW_RISK_LOAN)))
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            await finance.get_task(a2a_pb2.GetTaskRequest(id=low.task.id))

    # No token: Envoy refuses before any service hears of it.
    anonymous = await client_for(gateway, mesh_dir, None, "loan")
    async with anonymous:
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await anonymous.get_task(a2a_pb2.GetTaskRequest(id=low.task.id))

    # A tenant that is no template.
    async with grpc.aio.insecure_channel(
        gateway,
        interceptors=metadata_interceptors(
            [("authorization", f"Bearer {ensure_login(mesh_dir, 'requester').token}")]
        ),
    ) as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)
        unknown = message(LOW_RISK_LOAN)
        unknown.tenant = "no-such-template"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SendMessage(unknown, timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_http_json_routes_answer_unary_calls(gateway: str, mesh_dir: Path) -> None:
    """A2A's HTTP+JSON routes, transcoded by Envoy, driven by the SDK's REST transport
    (unary only: the card names the gRPC binding, whose streams the front door keeps)."""
    loan = await card(gateway, "loan")
    token = ensure_login(mesh_dir, "requester").token
    async with httpx.AsyncClient(
        timeout=CALL_TIMEOUT_S, headers={"authorization": f"Bearer {token}"}
    ) as http:
        rest = TenantTransportDecorator(RestTransport(http, loan, f"http://{gateway}"), "loan")
        sent = await rest.send_message(message(LOW_RISK_LOAN))
        assert sent.task.status.state == TS.TASK_STATE_COMPLETED
        got = await rest.get_task(a2a_pb2.GetTaskRequest(id=sent.task.id))
        assert got.status.state == TS.TASK_STATE_COMPLETED
        assert got.artifacts[0].parts[0].data == sent.task.artifacts[0].parts[0].data
        # Refusals arrive as HTTP statuses with Envoy's google.rpc.Status body (not the
        # binding's error envelope), so the SDK knows the status only.
        with pytest.raises(A2AError):
            await rest.get_task(a2a_pb2.GetTaskRequest(id=uuid.uuid4().hex[:20]))
