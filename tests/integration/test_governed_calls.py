"""Governed tool calls through the real tool proxy, policy service, NATS and OpenBao.

Stories: an agent with a task token calls its tools; every forged, expired, revoked,
replayed or mis-scoped token is refused; hostile arguments never reach a tool; the policy
decides (and a human approves big refunds, which then happen exactly once); when Vault or
the policy service is down nothing runs. Each refusal leaves an audit record and no side
effect in the effects outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from services.policy.app import PolicyService
from services.policy.settings import PolicySettings
from services.tool_proxy.app import ToolProxy
from services.tool_proxy.approvals import gate_id
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tools import CallInfo, SideEffect, Tool, ToolSpec
from services.tool_proxy.tools.builtin import effects_subject
from tessera.audit import check_receipt, read_all, tail, verify_entries
from tessera.launcher.ports import free_port
from tessera.runtime.bus import Topology, connect
from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import ErrorDetails, error_details
from tessera.runtime.identity import Workload
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import audit_pb2, events_pb2, tool_proxy_pb2, tool_proxy_pb2_grpc
from tessera.vault import InvalidToken, TaskToken, ToolSecret, VaultClient
from tessera.vault.audit_keys import read_public_keys
from tessera.vault.bootstrap import apply
from tests.conftest import OpenBao, private_openbao

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEST_TOOLS = ("test.noop", "test.slow", "mcp.notes")
TOKEN_MD = TASK_TOKEN_METADATA
REFUND = "billing.issue_refund"


# -- infrastructure ------------------------------------------------------------------------


Bao = OpenBao


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A dev OpenBao of this module's own: its token role gets test-only tools."""
    with private_openbao(tmp_path_factory.mktemp("bao")) as server:
        yield server


@pytest.fixture(scope="module")
def creds(bao: Bao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vault/ as shipped plus the test tools, applied; AppRole files by identity."""
    base = tmp_path_factory.mktemp("vaultcode")
    vault_dir = base / "vault"
    shutil.copytree(REPO / "vault", vault_dir)
    tools_file = vault_dir / "tools.yaml"
    spec = yaml.safe_load(tools_file.read_text())
    spec["tools"].extend({"name": name} for name in TEST_TOOLS)
    tools_file.write_text(yaml.safe_dump(spec))
    secrets_dir = base / "approle"
    return apply(bao.addr, bao.root_token, vault_dir, secrets_dir)


class Forwarder:
    """A TCP forwarder in front of Vault that a test can cut (Vault "down")."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._conns):
            writer.close()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keep the caller's address (task tokens are bound to the proxy's, 127.0.0.2).
        peer = writer.get_extra_info("peername")[0]
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port, local_addr=(peer, 0)
            )
        except OSError:
            writer.close()
            return
        self._conns.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def _noop(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    assert secret is not None and secret.data.get("api_key")
    return {"ok": True}


async def _slow(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    await asyncio.sleep(float(args.get("seconds", 5)))
    return {"slept": True}


def extra_tools_for_tests() -> list[Tool]:
    """test.noop and test.slow, registered by tests through the public registry API."""
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    return [
        Tool(
            ToolSpec(
                name="test.noop",
                description="does nothing",
                input_schema=schema,
                side_effect=SideEffect.READ_ONLY,
                category="test",
            ),
            _noop,
        ),
        Tool(
            ToolSpec(
                name="test.slow",
                description="sleeps",
                input_schema={
                    "type": "object",
                    "properties": {"seconds": {"type": "number", "maximum": 30}},
                    "additionalProperties": False,
                },
                side_effect=SideEffect.READ_ONLY,
                category="test",
                timeout_s=0.3,
            ),
            _slow,
        ),
    ]


@dataclass
class Mesh:
    proxy: ToolProxy
    policy: PolicyService
    nc: Client
    js: JetStreamContext
    topology: Topology
    coordinator: VaultClient
    inspector: VaultClient
    stub: tool_proxy_pb2_grpc.ToolProxyServiceStub
    """Calls as the billing agent (mTLS with its workload certificate)."""
    channel: grpc.aio.Channel
    forwarder: Forwarder
    settings: ToolProxySettings
    callers: dict[str, tool_proxy_pb2_grpc.ToolProxyServiceStub] = dataclasses.field(
        default_factory=dict
    )
    """Stubs calling as other agents, by agent name (see ``caller_stub``)."""
    workloads: list[Workload] = dataclasses.field(default_factory=list)
    creds: dict[str, Path] = dataclasses.field(default_factory=dict)
    vault_addr: str = ""


async def caller_stub(mesh: Mesh, agent: str) -> tool_proxy_pb2_grpc.ToolProxyServiceStub:
    """A stub that calls the proxy as ``agent``, with that agent's own certificate."""
    if agent not in mesh.callers:
        workload = await agent_workload(mesh.vault_addr, mesh.creds, agent)
        mesh.workloads.append(workload)
        mesh.callers[agent] = tool_proxy_pb2_grpc.ToolProxyServiceStub(
            proxy_channel(workload, mesh.proxy.address)
        )
    return mesh.callers[agent]


def proxy_channel(workload: Workload, address: str) -> grpc.aio.Channel:
    """mTLS to a tool proxy as ``workload``; no transparent retries, so each call is the
    one attempt the test makes."""
    return workload.channel(address, peer=workload.peer("service", "tool-proxy"), max_attempts=1)


async def coordinator_stub(mesh: Mesh) -> tool_proxy_pb2_grpc.ToolProxyServiceStub:
    """A stub that calls the proxy as the coordinator (its own workload certificate)."""
    key = "service/coordinator"
    if key not in mesh.callers:
        workload = await identity_workload(mesh.vault_addr, mesh.creds, "coordinator")
        mesh.workloads.append(workload)
        mesh.callers[key] = tool_proxy_pb2_grpc.ToolProxyServiceStub(
            proxy_channel(workload, mesh.proxy.address)
        )
    return mesh.callers[key]


async def decide(
    mesh: Mesh,
    wf: str,
    gate: str,
    *,
    approve: bool,
    by: str = "alice",
    stub: tool_proxy_pb2_grpc.ToolProxyServiceStub | None = None,
) -> tool_proxy_pb2.Approval:
    """A human decision handed to the proxy, by default as the coordinator does it."""
    request = tool_proxy_pb2.DecideApprovalRequest(
        workflow_id=wf,
        gate_id=gate,
        decision=(
            tool_proxy_pb2.APPROVAL_DECISION_APPROVE
            if approve
            else tool_proxy_pb2.APPROVAL_DECISION_REJECT
        ),
        decided_by=by,
    )
    caller = stub if stub is not None else await coordinator_stub(mesh)
    response = await caller.DecideApproval(request, timeout=5)
    return response.approval


async def agent_workload(vault_addr: str, creds: dict[str, Path], agent: str) -> Workload:
    return await identity_workload(vault_addr, creds, f"agent-{agent}")


async def identity_workload(vault_addr: str, creds: dict[str, Path], identity: str) -> Workload:
    """The workload certificate of ``identity`` (an AppRole of the bootstrap)."""
    settings = ServiceSettings(
        vault_addr=vault_addr, vault_approle_file=creds[identity], insecure_plaintext=False
    )
    return await Workload.start(settings)


def proxy_settings(
    nats_url: str,
    namespace: str,
    vault_addr: str,
    creds: dict[str, Path],
    policy_address: str,
    **overrides: Any,
) -> ToolProxySettings:
    base: dict[str, Any] = {
        "nats_url": nats_url,
        "namespace": namespace,
        "vault_addr": vault_addr,
        "vault_approle_file": creds["tool-proxy"],
        "policy_address": policy_address,
        # These suites tell the policy service's own decision story (its records, its
        # outage): the remote mode. The distributed default: test_policy_distribution.py.
        "policy_mode": "remote",
        "agent_rate_per_s": 1e6,
        "agent_burst": 10**6,
        "tool_rate_per_s": 1e6,
        "tool_burst": 10**6,
        "vault_attempts": 1,
        "vault_timeout_s": 1.0,
        "audit_hmac_key": "test-hmac-key-0123456789abcdef",
    }
    base.update(overrides)
    return ToolProxySettings(**base)


@contextlib.asynccontextmanager
async def governed_mesh(
    nats_url: str,
    bao: Bao,
    creds: dict[str, Path],
    *,
    name: str,
    extra_tools: Sequence[Tool] = (),
    policy_service_dir: Path = REPO / "policy",
    **proxy_overrides: Any,
) -> AsyncIterator[Mesh]:
    """The policy service and a tool proxy (reaching Vault through a cuttable forwarder)
    in-process on the real NATS and OpenBao, plus Vault clients acting as the
    coordinator and as an inspector."""
    namespace = name + secrets.token_hex(4)
    policy = PolicyService(
        PolicySettings(
            policy_dir=policy_service_dir,
            nats_url=nats_url,
            namespace=namespace,
            listen="127.0.0.1:0",
            instance_id=f"policy-{namespace}",
            vault_addr=bao.addr,
            vault_approle_file=creds["policy"],
            insecure_plaintext=False,
        )
    )
    await policy.start()
    forwarder = Forwarder(bao.port)
    await forwarder.up()
    settings = proxy_settings(
        nats_url, namespace, forwarder.addr, creds, policy.address, **proxy_overrides
    )
    proxy = ToolProxy(settings, replica_id=name)
    for tool in extra_tools:
        proxy.registry.register(tool)
    await proxy.start()
    nc = await connect(nats_url, name=f"{name}-test")
    coordinator = await VaultClient.from_approle_file(bao.addr, creds["coordinator"])
    inspector = await VaultClient.from_approle_file(bao.addr, creds["tool-proxy"])
    billing = await agent_workload(bao.addr, creds, "billing")
    channel = proxy_channel(billing, proxy.address)
    workloads = [billing]
    try:
        yield Mesh(
            proxy=proxy,
            policy=policy,
            nc=nc,
            js=nc.jetstream(),
            topology=Topology(namespace),
            coordinator=coordinator,
            inspector=inspector,
            stub=tool_proxy_pb2_grpc.ToolProxyServiceStub(channel),
            channel=channel,
            forwarder=forwarder,
            settings=settings,
            workloads=workloads,
            creds=creds,
            vault_addr=bao.addr,
        )
    finally:
        await channel.close()
        for workload in workloads:
            await workload.close()
        await proxy.stop()
        await policy.stop()
        await coordinator.close()
        await inspector.close()
        await forwarder.down()
        await nc.drain()


@pytest.fixture(scope="module")
async def mesh(nats_url: str, bao: Bao, creds: dict[str, Path]) -> AsyncIterator[Mesh]:
    async with governed_mesh(
        nats_url, bao, creds, name="tp", extra_tools=extra_tools_for_tests()
    ) as running:
        yield running


# -- helpers -----------------------------------------------------------------------------


def new_ids() -> tuple[str, str]:
    return "wf-" + secrets.token_hex(6), "task-" + secrets.token_hex(4)


async def task_token(
    mesh: Mesh,
    wf: str,
    task: str,
    *,
    tools: list[str],
    agent: str = "billing",
    uses: int = 10,
    ttl_s: int = 120,
) -> TaskToken:
    return await mesh.coordinator.create_task_token(
        tools=tools,
        ttl_s=ttl_s,
        num_uses=uses,
        meta={"workflow": wf, "task": task, "agent": agent},
    )


def refund_args(amount: float = 25.0) -> dict[str, Any]:
    return {"customer_id": "c-1", "invoice_id": "inv-1", "amount": amount, "currency": "EUR"}


async def invoke(
    mesh: Mesh,
    token: str | None,
    wf: str,
    task: str,
    tool: str,
    args: Mapping[str, Any] | None = None,
    *,
    key: str = "",
    timeout: float = 5.0,  # noqa: ASYNC109 (the gRPC deadline of the call)
    principal: str = "",
    caller: str = "billing",
) -> tool_proxy_pb2.InvokeToolResponse:
    """One InvokeTool as agent ``caller`` (its certificate; the token says whose it is)."""
    arguments = struct_pb2.Struct()
    arguments.update(dict(args or {}))
    request = tool_proxy_pb2.InvokeToolRequest(
        tool=tool,
        arguments=arguments,
        idempotency_key=key,
    )
    request.context.workflow_id, request.context.task_id = wf, task
    request.context.principal = principal
    metadata = ((TOKEN_MD, token),) if token is not None else ()
    stub = mesh.stub if caller == "billing" else await caller_stub(mesh, caller)
    response: tool_proxy_pb2.InvokeToolResponse = await stub.InvokeTool(
        request, metadata=metadata, timeout=timeout
    )
    return response


async def refused(call: Awaitable[Any]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return error_details(info.value)


async def effects(mesh: Mesh, wf: str) -> list[dict[str, Any]]:
    """Side effects recorded in the outbox for workflow ``wf``."""
    subject = effects_subject(mesh.topology)
    info = await mesh.js.stream_info(mesh.topology.events_stream, subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return []
    sub = await mesh.js.subscribe(
        subject,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    found: list[dict[str, Any]] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=2.0)
            body = json.loads(msg.data)
            if body["workflow_id"] == wf:
                found.append(body)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found


async def audit_records(mesh: Mesh, wf: str) -> list[audit_pb2.AuditRecord]:
    out = []
    async for entry in tail(mesh.js, mesh.topology, n=100_000):
        rec = entry.record
        if rec is not None and rec.workflow_id == wf and rec.actor == "tool-proxy":
            out.append(rec)
    return out


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def assert_refused_and_audited(
    mesh: Mesh,
    wf: str,
    details: ErrorDetails,
    code: grpc.StatusCode,
    reason: str,
    outcome: str,
) -> None:
    assert details.code == code, details
    assert details.reason == reason, details
    assert await effects(mesh, wf) == []
    records = await audit_records(mesh, wf)
    assert any(r.outcome == outcome and r.details["reason"] == reason for r in records), records


async def publish_revoked(mesh: Mesh, wf: str, accessors: list[str]) -> None:
    event = events_pb2.TokenRevoked(accessors=accessors, workflow_id=wf, reason="test")
    await mesh.js.publish(mesh.topology.events_subject("token.revoked"), event.SerializeToString())


# -- the happy path ------------------------------------------------------------------------


async def test_a_governed_call_carries_a_receipt_that_a_signed_checkpoint_covers(
    mesh: Mesh, bao: Bao
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["crm.lookup_customer"])

    response = await invoke(
        mesh, token.token, wf, task, "crm.lookup_customer", {"customer_id": "c-7"}
    )

    receipt = response.receipt
    assert receipt.writer == "tool-proxy-tp" and receipt.sequence > 0
    assert receipt.decision_id == response.decision_id and len(receipt.record_hash) == 32
    keys = await read_public_keys(bao.addr, bao.root_token)
    status: list[str] = []

    async def covered() -> bool:  # the proxy signs its head within its checkpoint interval
        stored, last = await read_all(mesh.js, mesh.topology)
        report = verify_entries(stored, last_stream_sequence=last, keys=keys)
        status.append(check_receipt(report, stored, receipt).status)
        if status[-1] != "covered":
            await asyncio.sleep(0.2)  # (reads the whole stream: not every 20 ms)
        return status[-1] == "covered"

    await eventually(covered, timeout_s=15.0)
    assert "failed" not in status


async def test_agent_reads_customer_and_refunds_once(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["crm.lookup_customer", REFUND])

    customer = await invoke(
        mesh, token.token, wf, task, "crm.lookup_customer", {"customer_id": "c-42"}
    )
    assert customer.result["customer_id"] == "c-42"
    assert customer.decision_id
    assert "api_key" not in json.dumps(dict(customer.result))

    first = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="refund-1")
    again = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="refund-1")

    assert not first.replayed and again.replayed
    assert again.result["refund_id"] == first.result["refund_id"]
    assert len(await effects(mesh, wf)) == 1

    async def audited() -> bool:
        outcomes = [r.outcome for r in await audit_records(mesh, wf)]
        return outcomes.count("executed") == 2 and "replayed" in outcomes

    await eventually(audited)
    records = await audit_records(mesh, wf)
    allow = [r for r in records if r.outcome == "allow"]
    assert len(allow) == 2 and all(r.decision_id for r in allow)
    assert token.token not in str(records)
    assert all(r.details["agent"] == "billing" for r in records)


async def test_side_effecting_tool_needs_an_idempotency_key(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    details = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args()))
    await assert_refused_and_audited(
        mesh,
        wf,
        details,
        grpc.StatusCode.INVALID_ARGUMENT,
        "IDEMPOTENCY_KEY_REQUIRED",
        "refused",
    )


# -- tokens --------------------------------------------------------------------------------


async def test_missing_token_is_unauthenticated(mesh: Mesh) -> None:
    wf, task = new_ids()
    details = await refused(invoke(mesh, None, wf, task, REFUND, refund_args(), key="k"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING", "refused"
    )


@pytest.mark.parametrize("bad", ["short", "s.abc def ghi jkl", "x" * 2000, "s.abc$def%ghi{}"])
async def test_malformed_token_is_refused_before_vault(mesh: Mesh, bad: str) -> None:
    wf, task = new_ids()
    details = await refused(invoke(mesh, bad, wf, task, REFUND, refund_args(), key="k"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED", "refused"
    )


async def test_forged_token_is_invalid(mesh: Mesh) -> None:
    wf, task = new_ids()
    details = await refused(
        invoke(mesh, "s." + secrets.token_urlsafe(18), wf, task, REFUND, refund_args(), key="k")
    )
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID", "refused"
    )


async def test_expired_token_is_invalid(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND], ttl_s=1)

    async def expired() -> bool:
        try:
            await mesh.inspector.lookup_token(token.token)
        except InvalidToken:
            return True
        return False

    await eventually(expired, timeout_s=10)
    details = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="k"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID", "refused"
    )


async def test_revocation_event_evicts_a_cached_token_at_once(mesh: Mesh) -> None:
    """The event alone (Vault still says valid) refuses the next call: the cache and the
    secret cache cannot keep a revoked token alive for their TTLs."""
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["kb.search", REFUND])
    await invoke(mesh, token.token, wf, task, "kb.search", {"query": "refund policy"})

    started = time.monotonic()
    await publish_revoked(mesh, wf, [token.accessor])

    async def refused_now() -> bool:
        try:
            await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="after-revoke")
        except grpc.aio.AioRpcError as err:
            return error_details(err).reason == "TOKEN_INVALID"
        raise AssertionError("a revoked token executed a refund")

    await eventually(refused_now, timeout_s=1.0)
    assert time.monotonic() - started < 1.0
    assert await effects(mesh, wf) == []


async def test_replay_after_the_workflow_ended_is_refused(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="once")

    await mesh.coordinator.revoke_accessor(token.accessor)  # the workflow ended
    await publish_revoked(mesh, wf, [token.accessor])

    async def refused_now() -> bool:
        try:
            await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="once")
        except grpc.aio.AioRpcError as err:
            assert error_details(err).code == grpc.StatusCode.UNAUTHENTICATED
            return True
        return False

    await eventually(refused_now, timeout_s=1.0)
    assert len(await effects(mesh, wf)) == 1


async def test_another_agents_token_for_another_task_is_refused(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, "task-of-triage", tools=[REFUND], agent="triage")
    details = await refused(
        invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="k", principal="billing")
    )
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE_MISMATCH", "denied"
    )
    records = await audit_records(mesh, wf)
    assert records[-1].details["agent"] == "triage"  # never the claimed principal
    assert records[-1].details["claimed_principal"] == "billing"


async def test_another_workflows_token_is_refused(mesh: Mesh) -> None:
    wf, task = new_ids()
    other_wf, _ = new_ids()
    token = await task_token(mesh, other_wf, task, tools=[REFUND])
    details = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="k"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE_MISMATCH", "denied"
    )


async def test_token_scoped_to_another_tool_is_refused(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["kb.search"])
    details = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="k"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.PERMISSION_DENIED, "TOOL_NOT_IN_SCOPE", "denied"
    )


async def test_concurrent_replays_get_exactly_the_use_limit(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND], uses=3)
    results = await asyncio.gather(
        *(
            invoke(mesh, token.token, wf, task, REFUND, refund_args(), key=f"k-{n}")
            for n in range(10)
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, tool_proxy_pb2.InvokeToolResponse)]
    errors = [error_details(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 3, errors
    assert len(errors) == 7
    assert all(e.code == grpc.StatusCode.UNAUTHENTICATED for e in errors), errors
    assert len(await effects(mesh, wf)) == 3

    # The allow record is written while the use is reserved: one written for a call that
    # then found no use left is followed by that call's refusal (same decision id). So
    # "allow" records not refused afterwards == executions.
    async def settled() -> bool:
        outcomes = [r.outcome for r in await audit_records(mesh, wf)]
        return outcomes.count("executed") == 3 and outcomes.count("refused") == 7

    await eventually(settled)
    records = await audit_records(mesh, wf)
    refused_ids = {r.decision_id for r in records if r.outcome == "refused"}
    allowed = [r for r in records if r.outcome == "allow" and r.decision_id not in refused_ids]
    executed = [r for r in records if r.outcome == "executed"]
    assert sorted(r.decision_id for r in allowed) == sorted(r.decision_id for r in executed)


async def test_concurrent_duplicates_execute_once(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    results = await asyncio.gather(
        *(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="dup") for _ in range(5)),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, grpc.aio.AioRpcError):
            assert error_details(r).reason == "IDEMPOTENCY_IN_PROGRESS"
    assert len(await effects(mesh, wf)) == 1


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"customer_id": "c-1", "amount": 5}, "arguments.invoice_id"),
        ({**refund_args(), "amount": "lots"}, "arguments.amount"),
        ({**refund_args(), "amount": -5}, "arguments.amount"),
        ({**refund_args(), "note": "x"}, "arguments.note"),
        ({**refund_args(), "currency": "BTC"}, "arguments.currency"),
    ],
)
async def test_arguments_breaking_the_schema_are_refused(
    mesh: Mesh, args: dict[str, Any], field: str
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    details = await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="k"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENTS_INVALID", "refused"
    )
    assert field in [f for f, _ in details.field_violations]


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.mark.parametrize(
    ("tool", "args", "code"),
    [
        (REFUND, {**refund_args(), "reason": "x" * 200_000}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (REFUND, {**refund_args(), "customer_id": "c-1\u202e"}, grpc.StatusCode.INVALID_ARGUMENT),
        (REFUND, {**refund_args(), "customer_id": "c\u200b-1"}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            REFUND,
            {**refund_args(), "customer_id": "c-1; rm -rf /"},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            REFUND,
            {**refund_args(), "customer_id": "../../etc/passwd"},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (REFUND, {**refund_args(), "reason": "a\x00b"}, grpc.StatusCode.INVALID_ARGUMENT),
        (REFUND, {**refund_args(), "cust\u200bomer_id": "c-1"}, grpc.StatusCode.INVALID_ARGUMENT),
        (REFUND, {**refund_args(), "reason": _nested(12)}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "email.send",
            {"to": "root@127.0.0.1", "subject": "s", "body": "b"},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "email.send",
            {"to": "a@localhost", "subject": "s", "body": "b"},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "email.send",
            {"to": "a@b.com\r\nBcc: x@evil.com", "subject": "s", "body": "b"},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
async def test_hostile_arguments_never_reach_a_tool(
    mesh: Mesh, tool: str, args: dict[str, Any], code: grpc.StatusCode
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[tool])
    details = await refused(invoke(mesh, token.token, wf, task, tool, args, key="k"))
    assert details.code == code, details
    assert await effects(mesh, wf) == []
    assert any(r.outcome == "refused" for r in await audit_records(mesh, wf))


async def test_undecodable_request_bytes_are_invalid_argument(mesh: Mesh) -> None:
    raw = mesh.channel.unary_unary(
        "/tessera.v1.ToolProxyService/InvokeTool",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- policy and approval ------------------------------------------------------------------


async def test_policy_deny_names_the_policy(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["credit.bureau_report"], agent="risk")
    details = await refused(
        invoke(
            mesh,
            token.token,
            wf,
            task,
            "credit.bureau_report",
            {"customer_id": "c-1"},
            caller="risk",
        )
    )
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED", "denied"
    )
    assert "pii-compliance-only" in details.metadata["policies"]


async def test_big_refund_runs_once_after_a_human_approves(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    args = refund_args(1500.0)

    details = await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="big"))
    gate = gate_id(task, REFUND, "big")
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "APPROVAL_REQUIRED"  # for clients that branch on the reason
    required = details.detail(tool_proxy_pb2.ApprovalRequired)  # the typed contract
    assert required is not None
    assert (required.gate_id, required.tool) == (gate, REFUND) and required.reason
    assert details.precondition_violations[0][:2] == ("APPROVAL", f"workflows/{wf}/gates/{gate}")
    assert await effects(mesh, wf) == []

    kv = await mesh.js.key_value(mesh.topology.approvals_bucket)
    entry = await kv.get(f"{wf}.{gate}")
    record = json.loads(entry.value or b"{}")
    assert record["state"] == "pending" and record["tool"] == REFUND
    assert record["task_id"] == task and record["arguments_digest"]

    # Still pending: asking again changes nothing.
    again = await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="big"))
    assert again.reason == "APPROVAL_REQUIRED"

    # The coordinator hands the human's decision to the proxy, which owns approvals.
    approval = await decide(mesh, wf, gate, approve=True, by="alice")
    assert approval.state == tool_proxy_pb2.APPROVAL_STATE_APPROVED
    assert (approval.decided_by, approval.task_id, approval.tool) == ("alice", task, REFUND)

    # Changed arguments under the same key are not covered by the approval.
    changed = await refused(
        invoke(mesh, token.token, wf, task, REFUND, refund_args(99999.0), key="big")
    )
    assert changed.code == grpc.StatusCode.PERMISSION_DENIED

    first = await invoke(mesh, token.token, wf, task, REFUND, args, key="big")
    second = await invoke(mesh, token.token, wf, task, REFUND, args, key="big")
    assert not first.replayed and second.replayed
    assert len(await effects(mesh, wf)) == 1
    records = await audit_records(mesh, wf)
    outcomes = [r.outcome for r in records]
    assert "approval_required" in outcomes and "allow" in outcomes
    (decided,) = [r for r in records if r.kind == audit_pb2.AUDIT_KIND_APPROVAL]
    assert decided.outcome == "approved" and decided.details["decided_by"] == "alice"
    assert decided.details["caller"].endswith("/service/coordinator")


async def test_rejected_approval_is_permission_denied(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    args = refund_args(5000.0)
    await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="no"))
    rejected = await decide(mesh, wf, gate_id(task, REFUND, "no"), approve=False)
    assert rejected.state == tool_proxy_pb2.APPROVAL_STATE_REJECTED

    details = await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="no"))
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_REJECTED", "denied"
    )


async def test_only_the_coordinator_may_decide_an_approval(mesh: Mesh) -> None:
    """An agent holding a pending big refund cannot approve it itself."""
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    args = refund_args(2000.0)
    await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="self"))
    gate = gate_id(task, REFUND, "self")

    details = await refused(decide(mesh, wf, gate, approve=True, by="billing", stub=mesh.stub))
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "CALLER_NOT_ALLOWED"

    still = await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="self"))
    assert still.reason == "APPROVAL_REQUIRED"
    assert await effects(mesh, wf) == []


async def test_a_repeated_decision_is_answered_as_the_first(mesh: Mesh) -> None:
    """The coordinator retries a decision whose answer it lost: same answer, recorded
    (and audited) once."""
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(1200.0), key="rep"))
    gate = gate_id(task, REFUND, "rep")

    first = await decide(mesh, wf, gate, approve=True, by="bob")
    second = await decide(mesh, wf, gate, approve=True, by="bob")
    assert second == first

    async def audited_once() -> bool:
        kinds = [r.kind for r in await audit_records(mesh, wf)]
        return kinds.count(audit_pb2.AUDIT_KIND_APPROVAL) == 1

    await eventually(audited_once)
    done = await invoke(mesh, token.token, wf, task, REFUND, refund_args(1200.0), key="rep")
    assert not done.replayed
    assert len(await effects(mesh, wf)) == 1


async def test_a_contradicting_decision_is_refused(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    args = refund_args(3000.0)
    await refused(invoke(mesh, token.token, wf, task, REFUND, args, key="flip"))
    gate = gate_id(task, REFUND, "flip")
    await decide(mesh, wf, gate, approve=True, by="carol")

    for approve, by in ((False, "carol"), (True, "dave")):
        details = await refused(decide(mesh, wf, gate, approve=approve, by=by))
        assert details.code == grpc.StatusCode.FAILED_PRECONDITION
        assert details.reason == "APPROVAL_ALREADY_DECIDED"
        assert details.metadata["state"] == "approved"
        assert details.metadata["decided_by"] == "carol"

    # The first decision stands: the call runs, once.
    await invoke(mesh, token.token, wf, task, REFUND, args, key="flip")
    assert len(await effects(mesh, wf)) == 1


async def test_deciding_an_unknown_gate_is_not_found(mesh: Mesh) -> None:
    wf, task = new_ids()
    details = await refused(decide(mesh, wf, gate_id(task, REFUND, "none"), approve=True))
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "APPROVAL_NOT_FOUND"
    bad = await refused(decide(mesh, "wf.*", "tool-x", approve=True, by=""))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in bad.field_violations} == {"workflow_id", "decided_by"}


# -- dependencies down ------------------------------------------------------------------------


async def test_policy_service_down_fails_closed(
    mesh: Mesh, nats_url: str, creds: dict[str, Path]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = proxy_settings(
        nats_url, mesh.topology.namespace, mesh.forwarder.addr, creds, dead, policy_timeout_s=0.5
    )
    proxy = ToolProxy(settings, replica_id="nopolicy")
    await proxy.start()
    try:
        async with proxy_channel(mesh.workloads[0], proxy.address) as ch:
            stub = tool_proxy_pb2_grpc.ToolProxyServiceStub(ch)
            wf, task = new_ids()
            token = await task_token(mesh, wf, task, tools=[REFUND])
            request = tool_proxy_pb2.InvokeToolRequest(tool=REFUND, idempotency_key="k")
            request.context.workflow_id, request.context.task_id = wf, task
            request.arguments.update(refund_args())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.InvokeTool(request, metadata=((TOKEN_MD, token.token),), timeout=5)
    finally:
        await proxy.stop()
    details = error_details(info.value)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "POLICY_UNAVAILABLE")
    assert await effects(mesh, wf) == []
    assert any(r.outcome == "unavailable" for r in await audit_records(mesh, wf))


async def test_vault_down_fails_closed(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    await mesh.forwarder.down()
    try:
        details = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="k"))
    finally:
        await mesh.forwarder.up()
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.UNAVAILABLE, "VAULT_UNAVAILABLE", "unavailable"
    )


async def test_slow_backend_is_deadline_exceeded(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["test.slow"])
    details = await refused(invoke(mesh, token.token, wf, task, "test.slow", {"seconds": 5}))
    assert details.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert any(r.outcome == "deadline_exceeded" for r in await audit_records(mesh, wf))


# -- ListTools and latency -------------------------------------------------------------------


async def test_list_tools_pages_through_every_tool(mesh: Mesh) -> None:
    names: list[str] = []
    token = ""
    while True:
        page = await mesh.stub.ListTools(
            tool_proxy_pb2.ListToolsRequest(page_size=2, page_token=token), timeout=5
        )
        assert len(page.tools) <= 2
        names.extend(t.name for t in page.tools)
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(names)
    assert {REFUND, "kb.search", "email.send", "credit.bureau_report", "test.noop"} <= set(names)
    refund = next(
        t
        for t in (await mesh.stub.ListTools(tool_proxy_pb2.ListToolsRequest(), timeout=5)).tools
        if t.name == REFUND
    )
    assert refund.input_schema["additionalProperties"] is False
    assert refund.requires_secret


async def test_governed_noop_latency_against_a_bare_hop(mesh: Mesh) -> None:
    """Not a timed test: prints p50/p99 of a governed no-op and of a bare gRPC hop."""
    n = int(os.environ.get("TESSERA_BENCH_N", "500"))
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["test.noop"], uses=n + 10)
    health = health_pb2_grpc.HealthStub(mesh.channel)
    for _ in range(20):  # warm-up: channel, caches
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    await invoke(mesh, token.token, wf, task, "test.noop")

    async def measure(fn: Callable[[], Awaitable[Any]]) -> list[float]:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await fn()
            samples.append((time.perf_counter() - t0) * 1000)
        return samples

    bare = await measure(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
    governed = await measure(lambda: invoke(mesh, token.token, wf, task, "test.noop"))

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1]

    report = {
        "n": n,
        "bare_p50_ms": round(statistics.median(bare), 3),
        "bare_p99_ms": round(pct(bare, 99), 3),
        "governed_p50_ms": round(statistics.median(governed), 3),
        "governed_p99_ms": round(pct(governed, 99), 3),
    }
    report["ratio_p50"] = round(report["governed_p50_ms"] / report["bare_p50_ms"], 2)
    print("\nTOOL_PROXY_LATENCY", json.dumps(report))
