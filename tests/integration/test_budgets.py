"""Budgets reserved before they are spent, and policies that read them live (issue 12,
parts 4 and 5), on the real NATS JetStream, OpenBao, tool proxy and policy service.

Stories: the coordinator's mirror of a workflow's ledger is the entry the proxy reads
(tests/unit/test_budget_ledger.py: a fan-out reserves exactly the budget); a task's calls
are refused by `budget-exhausted` as soon as the workflow's ledger says the money is
spent, and allowed again once it is not (the same token: the value is read at the call,
not frozen in the token); the negotiation agent's acceptance above the workflow's
`max_budget` (from its token) is refused, within it allowed, and with no `max_budget`
refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.coordinator.budget import Amounts, BudgetMirror, BudgetState
from tessera.budgets import ledger_key
from tessera.v1 import budget_pb2, common_pb2, tool_proxy_pb2
from tests.integration.test_governed_calls import (
    Bao,
    Mesh,
    bao,
    creds,
    governed_mesh,
    invoke,
    new_ids,
    refused,
)

__all__ = ["bao", "creds"]

pytestmark = pytest.mark.integration

INVOICES = "billing.get_invoices"
ACCEPT = "procurement.accept_offer"


@pytest.fixture(scope="module")
async def mesh(nats_url: str, bao: Bao, creds: dict[str, Path]) -> AsyncIterator[Mesh]:
    async with governed_mesh(nats_url, bao, creds, name="budget") as running:
        yield running


async def _token(mesh: Mesh, wf: str, task: str, tools: list[str], **meta: str) -> str:
    token = await mesh.coordinator.create_task_token(
        tools=tools, ttl_s=120, num_uses=20, meta={"workflow": wf, "task": task, **meta}
    )
    return token.token


async def _put(mesh: Mesh, wf: str, entry: budget_pb2.WorkflowBudget) -> None:
    """Write the workflow's ledger entry as the coordinator does."""
    kv = await mesh.js.key_value(mesh.topology.budgets_bucket)
    await kv.put(ledger_key(wf), entry.SerializeToString())


async def test_the_mirrored_entry_is_the_workflows_ledger_and_goes_with_it(mesh: Mesh) -> None:
    """The coordinator mirrors a workflow's ledger (its state's limits, commits and
    slices) into the bucket the tool proxy reads, and drops it when the workflow ends."""
    mirror = BudgetMirror(await mesh.js.key_value(mesh.topology.budgets_bucket))
    wf, task = new_ids()
    state = BudgetState(limits=Amounts(tool_calls=5, tokens=1000, cost_micros=10**6))
    state = state.reserve(f"{task}#1", Amounts(tool_calls=1, tokens=10, cost_micros=10))
    await mirror.put(wf, state)
    assert await mirror.read(wf) == state
    await mirror.drop(wf)
    assert await mirror.read(wf) is None


async def test_budget_exhausted_reads_the_live_ledger_not_the_token(mesh: Mesh) -> None:
    wf, task = new_ids()
    # The token's meta still says there is money (the old, frozen value): ignored.
    token = await _token(
        mesh,
        wf,
        task,
        [INVOICES],
        agent="billing",
        reservation=f"{task}#1",
        budget_remaining="999999",
    )
    spent = budget_pb2.WorkflowBudget(
        workflow_id=wf,
        limits=common_pb2.Budget(max_cost_micros=1_000_000, max_tool_calls=10),
        committed=common_pb2.Usage(cost_micros=1_000_000),
    )
    await _put(mesh, wf, spent)
    details = await refused(invoke(mesh, token, wf, task, INVOICES, {"customer_id": "C-1"}))
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "POLICY_DENIED"
    assert "budget-exhausted" in details.metadata["policies"].split(",")

    # The coordinator frees budget (another attempt's slice released): the very next call
    # with the same token sees it.
    spent.committed.cost_micros = 400_000
    await _put(mesh, wf, spent)
    response = await invoke(mesh, token, wf, task, INVOICES, {"customer_id": "C-1"})
    assert response.decision_id

    # The workflow ended (its entry dropped): nothing left, fail closed.
    kv = await mesh.js.key_value(mesh.topology.budgets_bucket)
    await kv.delete(ledger_key(wf))
    details = await refused(invoke(mesh, token, wf, task, INVOICES, {"customer_id": "C-1"}))
    assert "budget-exhausted" in details.metadata["policies"].split(",")


async def test_negotiation_price_cap_takes_max_budget_from_the_token(mesh: Mesh) -> None:
    wf, task = new_ids()
    within = await _token(
        mesh, wf, task, [ACCEPT], agent="negotiation", max_budget="1000000"
    )  # 10,000.00

    async def accept(token: str, price: float, key: str) -> tool_proxy_pb2.InvokeToolResponse:
        return await invoke(
            mesh,
            token,
            wf,
            task,
            ACCEPT,
            {"supplier": "acme", "price": price},
            key=key,
            caller="negotiation",
        )

    details = await refused(accept(within, 12000, "accept/1"))
    assert details.reason == "POLICY_DENIED"
    assert details.metadata["policies"] == "negotiation-price-cap"
    assert (await accept(within, 8550, "accept/2")).result["status"] == "accepted"
    # A token without max_budget: no price can be shown within budget.
    bare = await _token(mesh, wf, task, [ACCEPT], agent="negotiation")
    details = await refused(accept(bare, 100, "accept/3"))
    assert details.metadata["policies"] == "negotiation-price-cap"
