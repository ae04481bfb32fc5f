"""Tessera's tools over MCP, as a person's MCP client sees them: the `mcp` package's own
client over streamable HTTP, through a real Envoy (jwt_authn with a real OpenBao's
identity tokens, the gRPC-JSON transcoder), mTLS to the real tool proxy (its MCP face),
on the real NATS and OpenBao. Nothing is mocked.

Stories: a person lists the tools their policy allows (someone outside `tool-users` sees
none); a read-only call runs and its audit record names the person; no token, no entry;
a call with side effects waits for another person's approval (its requester cannot
approve it), then runs exactly once, and a retry with the same idempotency key replays
it; hostile messages get precise errors and the proxy keeps serving.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx2
import mcp_types
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import LATEST_HANDSHAKE_VERSION
from nats.js import JetStreamContext

from services.gateway.app import GatewayControlPlane
from services.gateway.settings import GatewaySettings
from services.tool_proxy.app import ToolProxy
from services.tool_proxy.tools import CallInfo, SideEffect, Tool, ToolSpec
from tessera.audit import tail
from tessera.launcher import infra
from tessera.launcher.descriptors import build_descriptor_set
from tessera.launcher.gateway import XdsTls
from tessera.launcher.ports import free_port
from tessera.runtime.bus import Topology, connect
from tessera.v1 import audit_pb2
from tessera.vault import ToolSecret
from tessera.vault.bootstrap import apply
from tessera.vault.humans import HumansSpec
from tests.conftest import GATEWAY_DIR, PROJECT_ROOT, OpenBao, private_openbao
from tests.integration.people import People, start_people
from tests.integration.test_governed_calls import proxy_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOOKUP, BUMP = "test.lookup", "test.bump"
KEY_META = "tessera/idempotencyKey"
PEOPLE = HumansSpec.model_validate(
    {
        "token": {"audience": "tessera", "ttl": "1h"},
        "groups": {"tool-users": "call tools over MCP", "approvers": "decide"},
        "users": [
            # Alice calls tools and approves others' calls, never her own.
            {"name": "alice", "groups": ["tool-users", "approvers"]},
            {"name": "bob", "groups": ["approvers"]},
            {"name": "dave", "groups": []},
        ],
    }
)


@dataclass
class Effects:
    """What the side-effecting test tool did, counted at the tool (not in stored
    results): effect id -> executions."""

    runs: dict[str, int] = field(default_factory=dict)


def _tools(effects: Effects) -> list[Tool]:
    async def lookup(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        assert secret is not None and secret.data.get("api_key")  # read for this call
        return {"answer": str(args["q"]).upper()}

    async def bump(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        effects.runs[call.effect_id] = effects.runs.get(call.effect_id, 0) + 1
        return {"bumped": args["n"]}

    return [
        Tool(
            ToolSpec(
                name=LOOKUP,
                description="looks a word up",
                input_schema={
                    "type": "object",
                    "properties": {"q": {"type": "string", "maxLength": 100}},
                    "required": ["q"],
                    "additionalProperties": False,
                },
                side_effect=SideEffect.READ_ONLY,
                category="test",
            ),
            lookup,
        ),
        Tool(
            ToolSpec(
                name=BUMP,
                description="bumps a counter",
                input_schema={
                    "type": "object",
                    "properties": {"n": {"type": "integer"}},
                    "required": ["n"],
                    "additionalProperties": False,
                },
                side_effect=SideEffect.EXTERNAL_ACTION,
                category="test",
            ),
            bump,
        ),
    ]


@dataclass(frozen=True)
class Face:
    url: str
    people: People
    js: JetStreamContext
    topology: Topology
    effects: Effects

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("http://").partition("/")[0].rpartition(":")
        return host, int(port)

    def client(self, user: str) -> Client:
        """The `mcp` package's client, with ``user``'s identity token."""
        token = self.people.token(user)
        http = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=30)
        return Client(streamable_http_client(self.url, http_client=http))

    async def http(
        self, method: str, path: str, body: bytes | None = None, *, user: str | None = "alice"
    ) -> tuple[int, bytes]:
        def send() -> tuple[int, bytes]:
            host, port = self.host_port
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                headers = {"content-type": "application/json", "accept": "application/json"}
                if user is not None:
                    headers["authorization"] = f"Bearer {self.people.token(user)}"
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        return await asyncio.to_thread(send)

    async def decide(self, user: str, approval: str, *, approve: bool = True) -> tuple[int, Any]:
        decision = "APPROVAL_DECISION_APPROVE" if approve else "APPROVAL_DECISION_REJECT"
        status, body = await self.http(
            "POST", f"/v1/{approval}:decide", json.dumps({"decision": decision}).encode(), user=user
        )
        return status, json.loads(body)

    async def audit(self, resource: str) -> list[Any]:
        """The tool proxy's records about ``resource`` (a tool: people's calls of it and
        the decisions on them; an approval: the policy's decisions on deciding it),
        oldest first."""
        return [
            e.record
            async for e in tail(self.js, self.topology, n=100_000)
            if e.record is not None
            and e.record.actor == "tool-proxy"
            and e.record.resource == resource
        ]


# -- the stack -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with private_openbao(tmp_path_factory.mktemp("mcp-bao")) as server:
        yield server


@pytest.fixture(scope="module")
def creds(bao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vault/ as shipped plus the test tools (their secrets seeded), applied."""
    base = tmp_path_factory.mktemp("mcp-vault")
    shutil.copytree(REPO / "vault", base / "vault")
    tools_file = base / "vault" / "tools.yaml"
    spec = yaml.safe_load(tools_file.read_text())
    spec["tools"].extend({"name": name} for name in (LOOKUP, BUMP))
    tools_file.write_text(yaml.safe_dump(spec))
    return apply(bao.addr, bao.root_token, base / "vault", base / "approle")


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Iterator[People]:
    directory = tmp_path_factory.mktemp("mcp-people")
    with private_openbao(directory) as openbao:
        yield start_people(openbao, directory / "secrets", PEOPLE)


@pytest.fixture(scope="module")
async def face(
    nats_url: str,
    infra_dir: Path,
    bao: OpenBao,
    creds: dict[str, Path],
    people: People,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Face]:
    namespace = "mcp" + secrets.token_hex(4)
    work = tmp_path_factory.mktemp("mcp-face")
    effects = Effects()
    proxy = ToolProxy(
        proxy_settings(
            nats_url,
            namespace,
            bao.addr,
            creds,
            "127.0.0.1:1",  # unused: decided in-process
            policy_mode="embedded",
            policy_dir=REPO / "policy",
            insecure_plaintext=False,
            mcp_max_message_bytes=64 * 1024,
        ),
        replica_id=namespace,
    )
    for tool in _tools(effects):
        proxy.registry.register(tool)
    await proxy.start()
    listen_port, admin_port = free_port(), free_port()
    cert_dir = work / "envoy-certs"
    control_plane = GatewayControlPlane(
        GatewaySettings(
            nats_url=nats_url,
            namespace=namespace,
            listen="127.0.0.1:0",
            envoy_listen=f"127.0.0.1:{listen_port}",
            access_log=str(infra_dir / "logs" / f"gw-{namespace}-access.log"),
            routes_file=GATEWAY_DIR / "routes.yaml",
            descriptor_set=build_descriptor_set(PROJECT_ROOT, work / "tessera.binpb"),
            tool_proxy_address=proxy.address,
            jwt_issuer=people.issuer,
            vault_addr=bao.addr,
            vault_approle_file=creds["gateway-control-plane"],
            insecure_plaintext=False,
            cert_dir=cert_dir,
        )
    )
    await control_plane.start()
    name = f"envoy-{namespace}"
    nc = await connect(nats_url, name=f"{namespace}-test")
    try:
        await asyncio.to_thread(
            infra.start_envoy,
            infra_dir,
            port=listen_port,
            admin_port=admin_port,
            gateway_dir=GATEWAY_DIR,
            xds_address=control_plane.address,
            xds_tls=XdsTls(cert_dir, "tessera.local", "gateway-control-plane"),
            name=name,
        )
        yield Face(
            f"http://127.0.0.1:{listen_port}/mcp",
            people,
            nc.jetstream(),
            Topology(namespace),
            effects,
        )
    finally:
        await asyncio.to_thread(infra.stop, infra_dir, name)
        await nc.drain()
        await control_plane.stop()
        await proxy.stop()


def idempotency_key(key: str) -> mcp_types.RequestParamsMeta:
    """A ``tools/call``'s ``_meta`` carrying its idempotency key (a key of Tessera's own,
    beside the typed ones)."""
    return cast(mcp_types.RequestParamsMeta, {KEY_META: key})


def _error(result: mcp_types.CallToolResult) -> dict[str, Any]:
    assert result.is_error, result
    meta = result.meta or {}
    error: dict[str, Any] = meta["tessera/error"]
    return error


# -- the stories -----------------------------------------------------------------------


async def test_a_person_lists_the_tools_their_policy_allows(face: Face) -> None:
    async with face.client("alice") as client:
        # The client's `auto` mode probes the 2026 era's server/discover, then falls back
        # to the initialize handshake the face speaks.
        assert client.protocol_version == LATEST_HANDSHAKE_VERSION
        listed = {t.name: t for t in (await client.list_tools()).tools}
    assert LOOKUP in listed and "kb.search" in listed  # read-only, no personal data
    assert listed[LOOKUP].input_schema["properties"]["q"]["type"] == "string"
    assert "approval" in (listed[BUMP].description or "")  # side effects: listed, flagged
    assert "credit.bureau_report" not in listed  # personal data: no person's policy
    async with face.client("dave") as client:  # outside tool-users
        assert (await client.list_tools()).tools == []


async def test_a_read_only_call_runs_and_its_audit_record_names_the_person(face: Face) -> None:
    async with face.client("alice") as client:
        result = await client.call_tool(LOOKUP, {"q": "cedar"})
    assert not result.is_error, result
    assert result.structured_content == {"answer": "CEDAR"}
    meta = result.meta or {}
    receipt = meta["tessera/receipt"]
    assert receipt["decisionId"] == meta["tessera/decisionId"]
    allowed = [r for r in await face.audit(LOOKUP) if r.outcome == "allow"]
    mine = [r for r in allowed if r.decision_id == meta["tessera/decisionId"]]
    assert len(mine) == 1
    assert mine[0].details["principal"] == "alice"
    assert mine[0].details["principal_kind"] == "user"  # verified: Envoy's mTLS identity
    assert mine[0].details["via"] == "mcp"
    assert mine[0].details["arguments"]["q"] == "cedar"
    assert "person-read-only-tool" in list(mine[0].details["policies"])

    async with face.client("dave") as client:  # outside tool-users: refused, audited
        denied = await client.call_tool(LOOKUP, {"q": "cedar"})
    assert _error(denied)["reason"] == "POLICY_DENIED"
    refusals = [r for r in await face.audit(LOOKUP) if r.outcome == "denied"]
    assert [r.details["principal"] for r in refusals] == ["dave"]


async def test_without_an_identity_token_envoy_refuses(face: Face) -> None:
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}).encode()
    status, _ = await face.http("POST", "/mcp", initialize, user=None)
    assert status == 401
    status, body = await face.http("POST", "/mcp", initialize)  # the same with a token
    assert status == 200 and json.loads(body)["result"] == {}
    status, _ = await face.http("GET", "/mcp")  # no server-initiated stream
    assert status == 405


async def test_a_side_effect_waits_for_another_person_then_runs_once(face: Face) -> None:
    async with face.client("alice") as client:
        keyless = await client.call_tool(BUMP, {"n": 1})
        assert _error(keyless)["reason"] == "IDEMPOTENCY_KEY_REQUIRED"

        key = idempotency_key("bump-" + secrets.token_hex(4))
        pending = await client.call_tool(BUMP, {"n": 1}, meta=key)
        error = _error(pending)
        assert error["reason"] == "APPROVAL_REQUIRED"
        approval = error["metadata"]["approval"]
        assert approval.startswith("toolCallApprovals/mcp-")
        again = await client.call_tool(BUMP, {"n": 1}, meta=key)  # still pending
        assert _error(again)["metadata"]["approval"] == approval
        assert face.effects.runs == {}

        status, own = await face.decide("alice", approval)  # four eyes
        assert status == 403, own
        assert "tool-call-not-own" in own["details"][0]["metadata"]["policies"]
        status, _ = await face.decide("dave", approval)  # no approver
        assert status == 403
        assert face.effects.runs == {}

        status, decided = await face.decide("bob", approval)
        assert status == 200, decided
        assert decided["approval"]["decidedBy"] == "bob"
        assert decided["approval"]["requestedBy"] == "alice"

        ran = await client.call_tool(BUMP, {"n": 1}, meta=key)
        assert not ran.is_error, ran
        assert ran.structured_content == {"bumped": 1}
        effect = (ran.meta or {})["tessera/effectId"]
        assert face.effects.runs == {effect: 1}

        replayed = await client.call_tool(BUMP, {"n": 1}, meta=key)
        assert replayed.structured_content == {"bumped": 1}
        assert (replayed.meta or {})["tessera/replayed"] is True
        assert face.effects.runs == {effect: 1}  # not run again

        other = await client.call_tool(BUMP, {"n": 2}, meta=key)  # the key, other arguments
        assert _error(other)["reason"] == "APPROVAL_ARGUMENTS_CHANGED"

    records = await face.audit(BUMP)
    allow = [r for r in records if r.outcome == "allow"]
    assert len(allow) == 1
    assert allow[0].details["principal"] == "alice"
    assert allow[0].details["approved_by"] == "bob"
    assert allow[0].details["effect_id"] == effect
    outcomes = [r.outcome for r in records]
    assert outcomes.count("approval_required") == 2 and "replayed" in outcomes
    (decision,) = [r for r in records if r.kind == audit_pb2.AUDIT_KIND_APPROVAL]
    assert (decision.outcome, decision.details["decided_by"]) == ("approved", "bob")
    # Who tried to decide it, in the policy's words: alice and dave refused, bob allowed.
    tried = [(r.details["principal"], r.outcome) for r in await face.audit(approval)]
    assert tried == [("alice", "deny"), ("dave", "deny"), ("bob", "allow")]


async def test_hostile_messages_get_precise_errors_and_the_proxy_keeps_serving(
    face: Face,
) -> None:
    huge = json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"x": "a" * 100_000}}
    ).encode()
    status, body = await face.http("POST", "/mcp", huge)
    assert status == 200
    error = json.loads(body)["error"]
    assert error["code"] == mcp_types.INVALID_REQUEST
    assert error["data"]["reason"] == "MESSAGE_TOO_LARGE"
    assert "limit is 65536" in error["message"]

    status, body = await face.http("POST", "/mcp", b"{not json")
    assert json.loads(body)["error"]["code"] == mcp_types.PARSE_ERROR
    status, body = await face.http("POST", "/mcp", b"[]")
    assert "batches" in json.loads(body)["error"]["message"]
    status, body = await face.http(
        "POST", "/mcp", json.dumps({"jsonrpc": "2.0", "id": 8, "method": "resources/list"}).encode()
    )
    assert json.loads(body)["error"]["code"] == mcp_types.METHOD_NOT_FOUND

    async with face.client("alice") as client:
        invalid = await client.call_tool(LOOKUP, {"q": "x" * 101, "extra": 1})
        error = _error(invalid)
        assert error["reason"] == "ARGUMENTS_INVALID"
        assert {v["field"] for v in error["fieldViolations"]} >= {"arguments.q"}
        missing = await client.call_tool("no.such_tool", {})
        assert _error(missing)["reason"] == "TOOL_NOT_FOUND"
        still = await client.call_tool(LOOKUP, {"q": "ok"})  # and it keeps serving
    assert still.structured_content == {"answer": "OK"}
