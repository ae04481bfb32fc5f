"""The tool proxy's embedded policy decision point (``policy_mode = "embedded"``).

The same policy-as-code as the policy service, decided in-process: allow, deny naming the
policy, approval required → approved → exactly one side effect, a broken policy change
refused while decisions continue on the last good set (and a valid one picked up), an
invalid set refusing start-up, ``tessera policy reload`` reaching the proxy at once, and
the proxy's own audit records carrying the decision
id, the determining policies and the policy set version (the policy service is never
asked).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from services.tool_proxy.app import ToolProxy
from services.tool_proxy.approvals import gate_id
from tessera.audit import tail
from tessera.policy.engine import PolicyLoadError
from tessera.v1 import policy_pb2, policy_pb2_grpc, tool_proxy_pb2
from tests.integration.test_governed_calls import (
    REFUND,
    REPO,
    Bao,
    Mesh,
    audit_records,
    bao,
    creds,
    decide,
    effects,
    eventually,
    extra_tools_for_tests,
    governed_mesh,
    identity_workload,
    invoke,
    new_ids,
    proxy_settings,
    refund_args,
    refused,
    task_token,
)

__all__ = ["bao", "creds"]

pytestmark = pytest.mark.integration

BROKEN = '@id("broken")\npermit (principal, action, resource) when { context.no_such_key };\n'
NO_CRM = (
    '@id("no-crm-today")\n'
    'forbid (principal is Agent, action == Action::"call_tool", resource is Tool)\n'
    'when { resource.name == "crm.lookup_customer" };\n'
)


@pytest.fixture(scope="module")
async def emesh(nats_url: str, bao: Bao, creds: dict[str, Path]) -> AsyncIterator[Mesh]:
    async with governed_mesh(
        nats_url,
        bao,
        creds,
        name="tpe",
        extra_tools=extra_tools_for_tests(),
        policy_mode="embedded",
        policy_dir=REPO / "policy",
    ) as running:
        yield running


def details_of(record: Any) -> dict[str, Any]:
    return json_format.MessageToDict(record.details)


async def policy_service_records(mesh: Mesh, wf: str) -> list[Any]:
    out = []
    async for entry in tail(mesh.js, mesh.topology, n=100_000):
        rec = entry.record
        if rec is not None and rec.workflow_id == wf and rec.actor == "policy":
            out.append(rec)
    return out


def serving_version(mesh: Mesh) -> str:
    store = mesh.proxy.policy_store
    assert store is not None
    return store.current.version


# -- decisions -------------------------------------------------------------------------------


async def test_embedded_allow_is_audited_with_its_decision(emesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(emesh, wf, task, tools=["crm.lookup_customer"])
    response = await invoke(
        emesh, token.token, wf, task, "crm.lookup_customer", {"customer_id": "c-7"}
    )
    assert response.result["customer_id"] == "c-7"
    assert response.decision_id

    async def executed() -> bool:
        return any(r.outcome == "executed" for r in await audit_records(emesh, wf))

    await eventually(executed)
    records = await audit_records(emesh, wf)
    allow = [r for r in records if r.outcome == "allow"]
    assert len(allow) == 1
    assert allow[0].decision_id == response.decision_id
    details = details_of(allow[0])
    assert details["decision"] == "DECISION_ALLOW"
    assert details["policies"] == ["declared-tool"]
    assert details["policy_set_version"] == serving_version(emesh)
    assert details["policy_mode"] == "embedded"
    # Decided in-process: the policy service never saw this call.
    assert await policy_service_records(emesh, wf) == []


async def test_embedded_deny_names_the_policy(emesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(emesh, wf, task, tools=["credit.bureau_report"], agent="risk")
    details = await refused(
        invoke(
            emesh,
            token.token,
            wf,
            task,
            "credit.bureau_report",
            {"customer_id": "c-1"},
            caller="risk",
        )
    )
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert "pii-compliance-only" in details.metadata["policies"]
    assert await effects(emesh, wf) == []
    records = await audit_records(emesh, wf)
    denied = [r for r in records if r.outcome == "denied"]
    assert len(denied) == 1
    assert denied[0].decision_id == details.metadata["decision_id"]
    audited = details_of(denied[0])
    assert audited["decision"] == "DECISION_DENY"
    assert "pii-compliance-only" in audited["policies"]
    assert audited["policy_set_version"] == serving_version(emesh)
    assert await policy_service_records(emesh, wf) == []


async def test_embedded_approval_then_exactly_one_refund(emesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(emesh, wf, task, tools=[REFUND])
    args = refund_args(1500.0)

    details = await refused(invoke(emesh, token.token, wf, task, REFUND, args, key="big"))
    gate = gate_id(task, REFUND, "big")
    assert (details.code, details.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "APPROVAL_REQUIRED",
    )
    assert details.metadata["reason"] == "Refunds above 1000.00 need a human approval"
    assert await effects(emesh, wf) == []

    # The human decision reaches the proxy as the coordinator hands it over.
    approval = await decide(emesh, wf, gate, approve=True)
    assert approval.state == tool_proxy_pb2.APPROVAL_STATE_APPROVED

    first = await invoke(emesh, token.token, wf, task, REFUND, args, key="big")
    second = await invoke(emesh, token.token, wf, task, REFUND, args, key="big")
    assert not first.replayed and second.replayed
    assert len(await effects(emesh, wf)) == 1

    records = await audit_records(emesh, wf)
    pending = [r for r in records if r.outcome == "approval_required"]
    assert pending and details_of(pending[0])["policies"] == ["refund-needs-approval"]
    assert details_of(pending[0])["decision"] == "DECISION_APPROVAL_REQUIRED"
    allow = [r for r in records if r.outcome == "allow"]
    assert len(allow) == 1 and allow[0].decision_id == first.decision_id
    assert details_of(allow[0])["policies"] == ["refund-approved"]
    assert details_of(allow[0])["approval"] == "approved"
    assert await policy_service_records(emesh, wf) == []


# -- hot reload ------------------------------------------------------------------------------


def copy_of_the_policies(tmp_path: Path) -> Path:
    policy_dir = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy_dir)
    return policy_dir


def embedded_mesh(
    nats_url: str, bao: Bao, creds: dict[str, Path], name: str, policy_dir: Path, *, poll_s: float
) -> contextlib.AbstractAsyncContextManager[Mesh]:
    """A mesh whose tool proxy decides from ``policy_dir``, polling it every ``poll_s``."""
    return governed_mesh(
        nats_url,
        bao,
        creds,
        name=name,
        policy_mode="embedded",
        policy_dir=policy_dir,
        policy_poll_interval_s=poll_s,
    )


async def test_invalid_policy_change_is_refused_while_decisions_continue(
    nats_url: str, bao: Bao, creds: dict[str, Path], tmp_path: Path
) -> None:
    policy_dir = copy_of_the_policies(tmp_path)
    async with embedded_mesh(nats_url, bao, creds, "tpr", policy_dir, poll_s=0.05) as mesh:
        store = mesh.proxy.policy_store
        assert store is not None
        good = store.current.version
        wf, task = new_ids()
        token = await task_token(mesh, wf, task, tools=["crm.lookup_customer"], uses=20)

        async def lookup() -> Any:
            return await invoke(
                mesh, token.token, wf, task, "crm.lookup_customer", {"customer_id": "c-1"}
            )

        assert (await lookup()).decision_id

        # A change that does not validate: refused by the watcher, the good set serves on.
        (policy_dir / "policies" / "99_broken.cedar").write_text(BROKEN)

        async def refused_by_watcher() -> bool:
            return "99_broken.cedar" in store.last_error

        await eventually(refused_by_watcher)
        with pytest.raises(PolicyLoadError):
            await store.reload()
        assert store.current.version == good
        during = await lookup()
        assert during.decision_id

        # Fixed: a valid change is picked up without a restart.
        (policy_dir / "policies" / "99_broken.cedar").unlink()
        (policy_dir / "policies" / "60_no_crm.cedar").write_text(NO_CRM)

        async def reloaded() -> bool:
            return store.current.version != good and not store.last_error

        await eventually(reloaded)
        details = await refused(lookup())
        assert (details.code, details.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "POLICY_DENIED",
        )
        assert details.metadata["policies"] == "no-crm-today"

        records = await audit_records(mesh, wf)
        allow = [r for r in records if r.outcome == "allow"]
        assert {r.decision_id for r in allow} >= {during.decision_id}
        assert all(details_of(r)["policy_set_version"] == good for r in allow)
        denied = [r for r in records if r.outcome == "denied"]
        assert len(denied) == 1
        assert details_of(denied[0])["policy_set_version"] == store.current.version


async def test_tessera_policy_reload_reaches_an_embedded_proxy_at_once(
    nats_url: str, bao: Bao, creds: dict[str, Path], tmp_path: Path
) -> None:
    policy_dir = copy_of_the_policies(tmp_path)
    # Polling hourly: only the announcement can bring the change in time.
    async with embedded_mesh(nats_url, bao, creds, "tpn", policy_dir, poll_s=3600) as mesh:
        before = serving_version(mesh)
        (policy_dir / "policies" / "60_no_crm.cedar").write_text(NO_CRM)
        operator = await identity_workload(bao.addr, creds, "operator")
        policy = operator.channel(
            mesh.policy.address, peer=operator.peer("service", "policy"), service="test"
        )
        try:
            # What `tessera policy reload` calls.
            await policy_pb2_grpc.PolicyServiceStub(policy).ReloadPolicies(
                policy_pb2.ReloadPoliciesRequest(), timeout=5
            )
        finally:
            await policy.close()
            await operator.close()

        async def reloaded() -> bool:
            return serving_version(mesh) != before

        await eventually(reloaded)
        wf, task = new_ids()
        token = await task_token(mesh, wf, task, tools=["crm.lookup_customer"])
        details = await refused(
            invoke(mesh, token.token, wf, task, "crm.lookup_customer", {"customer_id": "c-1"})
        )
        assert details.metadata["policies"] == "no-crm-today"


async def test_invalid_policy_set_refuses_to_start(
    nats_url: str, creds: dict[str, Path], tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy_dir)
    (policy_dir / "policies" / "99_broken.cedar").write_text(BROKEN)
    settings = proxy_settings(
        nats_url,
        "tpbad",
        "http://127.0.0.1:1",
        creds,
        "127.0.0.1:1",
        policy_mode="embedded",
        policy_dir=policy_dir,
    )
    proxy = ToolProxy(settings, replica_id="badpolicy")
    try:
        with pytest.raises(PolicyLoadError) as info:
            await proxy.start()
    finally:
        await proxy.stop()
    assert any("99_broken.cedar" in subject for subject, _ in info.value.errors)
