"""The policy service end to end: gRPC Check, audit records on real NATS, hot reload."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from services.policy.app import PolicyService
from services.policy.settings import PolicySettings
from tessera.audit import tail, verify
from tessera.runtime.bus import connect
from tessera.runtime.errors import error_details
from tessera.runtime.grpc_client import channel
from tessera.v1 import audit_pb2, common_pb2, policy_pb2, policy_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
BILLING_TOOLS = ["billing.get_invoices", "billing.issue_refund"]


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _check(
    tool: str = "billing.get_invoices",
    *,
    agent: str = "billing",
    tools: list[str] | None = None,
    tier: str = "standard",
    pii: bool = False,
    context: dict[str, Any] | None = None,
) -> policy_pb2.CheckRequest:
    return policy_pb2.CheckRequest(
        context=common_pb2.RequestContext(workflow_id="wf-1", task_id="t-1"),
        principal=common_pb2.Entity(
            type="Agent",
            id=agent,
            attributes=_struct({"tier": tier, "tools": BILLING_TOOLS if tools is None else tools}),
        ),
        action="call_tool",
        resource=common_pb2.Entity(
            type="Tool",
            id=tool,
            attributes=_struct({"side_effect": "read_only", "pii": pii, "category": "billing"}),
        ),
        context_attributes=_struct({"budget_remaining": 100_000, **(context or {})}),
    )


class Mesh:
    def __init__(self, service: PolicyService, stub: policy_pb2_grpc.PolicyServiceStub) -> None:
        self.service = service
        self.stub = stub

    @property
    def policy_dir(self) -> Path:
        return self.service.settings.policy_dir


@pytest.fixture(params=["async", "sync"])
async def mesh(
    request: pytest.FixtureRequest, tmp_path: Path, nats_url: str, namespace: str
) -> AsyncIterator[Mesh]:
    """The service in each decision-audit mode (async is the default)."""
    policy_dir = tmp_path / "policy"
    shutil.copytree(ROOT / "policy", policy_dir)
    settings = PolicySettings(
        listen="127.0.0.1:0",
        nats_url=nats_url,
        namespace=namespace,
        policy_dir=policy_dir,
        poll_interval_s=0.2,
        instance_id="policy-it",
        decision_audit=request.param,
        decision_audit_queue=8,  # small, so "bounded" below is a handful of decisions
    )
    service = PolicyService(settings)
    await service.start()
    chan = channel(service.address, service="test")
    try:
        yield Mesh(service, policy_pb2_grpc.PolicyServiceStub(chan))
    finally:
        await chan.close()
        await service.stop()


async def _audit_records(mesh: Mesh) -> list[audit_pb2.AuditRecord]:
    nc = await connect(mesh.service.settings.nats_url, name="test-reader")
    try:
        js = nc.jetstream()
        return [
            e.record async for e in tail(js, mesh.service.topology, n=1000) if e.record is not None
        ]
    finally:
        await nc.close()


async def test_allow_deny_and_approval_over_grpc_each_audited(mesh: Mesh) -> None:
    allowed = await mesh.stub.Check(_check("billing.get_invoices"))
    denied = await mesh.stub.Check(_check("crm.lookup_customer"))
    approval = await mesh.stub.Check(_check("billing.issue_refund", context={"amount": 250_000}))

    assert allowed.decision == policy_pb2.DECISION_ALLOW
    assert list(allowed.determining_policies) == ["declared-tool"]
    assert denied.decision == policy_pb2.DECISION_DENY
    assert list(denied.determining_policies) == ["undeclared-tool"]
    assert approval.decision == policy_pb2.DECISION_APPROVAL_REQUIRED
    assert approval.approval_reason == "Refunds above 1000.00 need a human approval"
    info = (await mesh.stub.GetPolicySet(policy_pb2.GetPolicySetRequest())).policy_set
    assert {r.policy_set_version for r in (allowed, denied, approval)} == {info.version}

    wanted = {allowed.decision_id, denied.decision_id, approval.decision_id}

    async def recorded() -> bool:  # written before the answer (sync) or just after (async)
        return wanted <= {r.decision_id for r in await _audit_records(mesh)}

    await _until(recorded)
    records = await _audit_records(mesh)
    by_decision = {r.decision_id: r for r in records}
    assert [r.decision_id for r in records if r.decision_id in wanted] == [
        allowed.decision_id,
        denied.decision_id,
        approval.decision_id,
    ], "decision records are written in the order of the decisions"
    for response, outcome in (
        (allowed, "allow"),
        (denied, "deny"),
        (approval, "approval_required"),
    ):
        record = by_decision[response.decision_id]
        assert record.kind == audit_pb2.AUDIT_KIND_POLICY_DECISION
        assert record.outcome == outcome
        assert record.workflow_id == "wf-1" and record.actor == "policy"
    assert by_decision[denied.decision_id].resource == "crm.lookup_customer"
    nc = await connect(mesh.service.settings.nats_url, name="test-verify")
    try:
        assert (await verify(nc.jetstream(), mesh.service.topology)).ok
    finally:
        await nc.close()


async def test_malformed_requests_are_invalid_argument_with_fields(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.stub.Check(policy_pb2.CheckRequest(action="call_tool"))
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in details.field_violations} == {"principal", "resource"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.stub.Check(_check(context={"amount": 10.5}))
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details.field_violations] == ["context_attributes.amount"]


async def test_audit_unwritable_fails_closed(mesh: Mesh) -> None:
    nc = await connect(mesh.service.settings.nats_url, name="test-saboteur")
    try:
        await nc.jetstream().delete_stream(mesh.service.topology.audit_stream)
    finally:
        await nc.close()

    # sync: the very first Check is refused. async: a decision answered before the writer
    # observed the failure may be queued, but none after it; the queue is bounded (by the
    # backlog, plus the records riding in the one write under way when it fails).
    assert mesh.service.servicer is not None
    bound = mesh.service.settings.decision_audit_queue + mesh.service.servicer.audit.max_carried
    answered = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        for _ in range(bound + 1):
            await mesh.stub.Check(_check("billing.get_invoices"))
            answered += 1

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value).reason == "AUDIT_UNAVAILABLE"
    if mesh.service.settings.decision_audit == "sync":
        assert answered == 0
    else:
        assert answered <= bound
    for _ in range(3):  # and it stays closed while the stream is gone
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.stub.Check(_check("billing.get_invoices"))
        assert error_details(caught.value).reason == "AUDIT_UNAVAILABLE"


async def _until(predicate: Any, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.05)


async def test_hot_reload_picks_up_a_new_policy_file(mesh: Mesh) -> None:
    before = await mesh.stub.Check(_check("billing.get_invoices"))
    assert before.decision == policy_pb2.DECISION_ALLOW
    (mesh.policy_dir / "policies" / "60_freeze.cedar").write_text(
        '@id("billing-freeze")\n'
        'forbid (principal, action == Action::"call_tool", resource is Tool)\n'
        'when { resource.category == "billing" };\n'
    )

    async def frozen() -> bool:
        response = await mesh.stub.Check(_check("billing.get_invoices"))
        return list(response.determining_policies) == ["billing-freeze"]

    await _until(frozen)
    info = (await mesh.stub.GetPolicySet(policy_pb2.GetPolicySetRequest())).policy_set
    assert "billing-freeze" in info.policy_ids and info.version != before.policy_set_version


async def test_invalid_change_is_refused_and_old_set_keeps_deciding(mesh: Mesh) -> None:
    serving = (await mesh.stub.GetPolicySet(policy_pb2.GetPolicySetRequest())).policy_set
    (mesh.policy_dir / "policies" / "20_billing.cedar").write_text(
        '@id("broken") permit (principal, action, resource) when { context.nope > 1 };'
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.stub.ReloadPolicies(policy_pb2.ReloadPoliciesRequest())

    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "POLICY_SET_INVALID"
    assert any(
        subject == "policies/20_billing.cedar#broken" and "nope" in description
        for _, subject, description in details.precondition_violations
    )
    info = (await mesh.stub.GetPolicySet(policy_pb2.GetPolicySetRequest())).policy_set
    assert info.version == serving.version
    assert "nope" in info.last_error
    refund = await mesh.stub.Check(_check("billing.issue_refund", context={"amount": 500}))
    assert refund.decision == policy_pb2.DECISION_ALLOW
    assert list(refund.determining_policies) == ["refund-within-limit"]
    assert refund.policy_set_version == serving.version
