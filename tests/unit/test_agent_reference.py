"""The reference agents' rules (docs/reference-workflows.md), handler by handler."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest

from services.agents.account.agent import account
from services.agents.aggregator.agent import aggregate
from services.agents.billing.agent import agent as billing_agent
from services.agents.billing.agent import billing, refund_key, reverse
from services.agents.churn.agent import agent as churn_agent
from services.agents.churn.agent import churn
from services.agents.compliance.agent import compliance
from services.agents.credit.agent import credit
from services.agents.document_analysis.agent import agent as document_agent
from services.agents.document_analysis.agent import clarification, document_analysis
from services.agents.fraud.agent import fraud
from services.agents.negotiation.agent import negotiation
from services.agents.risk.agent import risk
from services.agents.sourcing.agent import agent as sourcing_agent
from services.agents.sourcing.agent import cancel_order, sourcing
from services.agents.synthesis.agent import synthesis
from services.agents.technical.agent import technical
from services.agents.triage.agent import triage
from tessera.agent import TaskContext
from tessera.runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    TesseraError,
    to_grpc_status,
)

TOOL_ANSWERS: dict[str, dict[str, Any]] = {
    "crm.lookup_customer": {"customer_id": "C-9", "tier": "premium"},
    "billing.get_invoices": {
        "invoices": [{"invoice_id": "inv-000001", "amount": 42.5, "currency": "EUR"}]
    },
    "billing.issue_refund": {"refund_id": "rf-1", "status": "issued"},
    "billing.reverse_refund": {"reversed": True, "refund_id": "rf-1", "reversal_id": "rv-1"},
    "kb.search": {"hits": [{"id": "kb-0001", "title": "Known issue"}]},
    "email.send": {"message_id": "m-1", "status": "queued"},
    "credit.bureau_report": {"score": 700},
    "procurement.accept_offer": {"acceptance_id": "ac-1", "status": "accepted"},
}
CALLS: list[tuple[str, dict[str, Any]]] = []
KEYS: list[tuple[str, str]] = []
"""(tool, idempotency key) of each call, in order."""


async def answer_tool(
    _ctx: TaskContext, name: str, arguments: dict[str, Any], key: str
) -> dict[str, Any]:
    """The handlers' rules are under test here; governed calls are tested against the
    real tool proxy in tests/integration."""
    CALLS.append((name, arguments))
    KEYS.append((name, key))
    return TOOL_ANSWERS[name]


def ctx(capability: str, attempt: int = 1, **blackboard: Any) -> TaskContext:
    return TaskContext(
        capability=capability, attempt=attempt, blackboard=blackboard, _tool_caller=answer_tool
    )


def ticket(text: str) -> dict[str, Any]:
    return {"id": "T-1", "customer_id": "C-9", "text": text}


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("I want a REFUND", "billing"),
        ("wrong invoice", "billing"),
        ("double charge", "billing"),
        ("the app crashes with an Error", "technical"),
        ("found a bug", "technical"),
        ("forgot my password", "account"),
        ("cannot login", "account"),
        ("ping-pong refund", "billing"),
    ],
)
async def test_triage_routes_by_keyword(text: str, category: str) -> None:
    result = await triage(ctx("support.triage", ticket=ticket(text)))
    assert result.writes == {"category": category}
    assert result.handoff is not None
    assert result.handoff.capability == f"support.{category}"
    assert result.usage.tokens == len(text) // 4


async def test_triage_without_a_keyword_does_not_hand_off() -> None:
    result = await triage(ctx("support.triage", ticket=ticket("hello there")))
    assert result.handoff is None


async def test_the_ping_pong_ticket_bounces_without_writing() -> None:
    to_account = await billing(ctx("support.billing", ticket=ticket("ping-pong refund")))
    to_billing = await account(ctx("support.account", ticket=ticket("ping-pong refund")))
    assert to_account.handoff is not None and to_account.handoff.capability == "support.account"
    assert to_billing.handoff is not None and to_billing.handoff.capability == "support.billing"
    assert to_account.writes == {} and to_billing.writes == {}


async def test_specialists_write_their_notes_and_stop() -> None:
    for handler, capability, key in [
        (billing, "support.billing", "billing_notes"),
        (technical, "support.technical", "technical_notes"),
        (account, "support.account", "account_notes"),
    ]:
        result = await handler(ctx(capability, ticket=ticket("refund please, app crash")))
        assert set(result.writes) == {key}
        assert result.handoff is None


async def test_synthesis_replies_from_the_notes() -> None:
    result = await synthesis(
        ctx(
            "support.synthesis",
            ticket=ticket("refund"),
            category="billing",
            billing_notes="refund approved",
        )
    )
    assert isinstance(result.output, dict)
    assert "refund approved" in result.output["reply"]
    assert result.writes == {"reply": result.output["reply"]}


async def test_missing_tax_id_hands_off_to_clarification_and_back() -> None:
    application = {"applicant": "Ada Lovelace", "amount": 25_000, "country": "GB"}
    first = await document_analysis(ctx("loan.document_analysis", application=application))
    assert first.handoff is not None
    assert first.handoff.capability == "loan.clarification"
    assert first.handoff.reason == "tax id missing"
    assert first.writes == {}

    clarified = await clarification(ctx("loan.clarification", application=application))
    expected = "TIN-" + hashlib.sha256(b"Ada Lovelace").hexdigest()[:6]
    assert clarified.writes == {"tax_id": expected}
    assert clarified.handoff is not None
    assert clarified.handoff.capability == "loan.document_analysis"

    done = await document_analysis(
        ctx("loan.document_analysis", application=application, tax_id=expected)
    )
    assert done.handoff is None
    assert done.writes == {"documents": {"verified": True, "tax_id": expected}}


async def test_a_tax_id_in_the_application_is_enough() -> None:
    application = {"applicant": "Ada", "amount": 1, "country": "GB", "tax_id": "TIN-1"}
    result = await document_analysis(ctx("loan.document_analysis", application=application))
    assert result.writes == {"documents": {"verified": True, "tax_id": "TIN-1"}}
    assert set(document_agent.capabilities) == {"loan.document_analysis", "loan.clarification"}


@pytest.mark.parametrize(
    ("amount", "score", "band"),
    [
        (25_000, 25, "low"),
        (30_000, 30, "medium"),
        (69_999, 69.999, "medium"),
        (70_000, 70, "high"),
        (5_000_000, 100, "high"),
    ],
)
async def test_risk_score_and_band(amount: float, score: float, band: str) -> None:
    result = await risk(ctx("loan.risk", application={"amount": amount}))
    assert result.writes["risk_score"] == pytest.approx(score)
    assert result.writes["risk_band"] == band


@pytest.mark.parametrize(
    ("application", "flagged"),
    [
        ({"country": "GB", "amount": 25_000}, False),
        ({"country": "KP", "amount": 25_000}, True),
        ({"country": "XX", "amount": 1}, True),
        ({"country": "GB", "amount": 1_000_000}, True),
    ],
)
async def test_aml_flag_requests_approval(application: dict[str, Any], flagged: bool) -> None:
    result = await compliance(ctx("loan.compliance", application=application, risk_band="low"))
    assert result.writes["compliance"] == {"aml_flag": flagged, "decision": "approved"}
    if flagged:
        assert result.approval_request is not None
        assert result.approval_request.startswith("AML risk: ")
    else:
        assert result.approval_request is None


async def test_sourcing_lists_suppliers_then_orders_the_accepted_offer() -> None:
    first = await sourcing(ctx("procurement.sourcing", item="chairs", quantity=100))
    assert [s["unit_price"] for s in first.writes["suppliers"]] == [120, 95]
    assert first.handoff is not None
    assert first.handoff.capability == "procurement.negotiation"

    offer = {"supplier": "globex", "price": 8550.0}
    second = await sourcing(ctx("procurement.sourcing", item="chairs", quantity=100, offer=offer))
    assert second.writes == {"purchase_order": offer}
    assert second.handoff is None


async def test_negotiation_asks_list_price_first_then_discounts_the_cheapest() -> None:
    suppliers = [{"name": "acme", "unit_price": 120}, {"name": "globex", "unit_price": 95}]
    bb = {"suppliers": suppliers, "quantity": 100.0, "max_budget": 10_000.0}
    first = await negotiation(ctx("procurement.negotiation", attempt=1, **bb))
    second = await negotiation(ctx("procurement.negotiation", attempt=2, **bb))
    assert first.writes["offer"] == {"supplier": "acme", "price": 12_000}
    assert second.writes["offer"] == {"supplier": "globex", "price": 8_550}
    for result in (first, second):
        assert result.handoff is not None
        assert result.handoff.capability == "procurement.sourcing"
    with pytest.raises(FailedPrecondition):
        await negotiation(ctx("procurement.negotiation", quantity=1))


def _refusal(exc: TesseraError) -> grpc.aio.AioRpcError:
    """What the tool proxy's refusal looks like to an agent (rich status in trailers)."""
    st = to_grpc_status(exc)
    return grpc.aio.AioRpcError(
        st.code, grpc.aio.Metadata(), grpc.aio.Metadata(*st.trailing_metadata), st.details
    )


async def test_negotiation_accepts_its_offer_once_per_offer_and_a_policy_refusal_is_retryable() -> (
    None
):
    suppliers = [{"name": "acme", "unit_price": 120}, {"name": "globex", "unit_price": 95}]
    bb = {"suppliers": suppliers, "quantity": 100.0, "max_budget": 10_000.0}
    CALLS.clear()
    KEYS.clear()
    await negotiation(ctx("procurement.negotiation", attempt=2, **bb))
    assert CALLS == [("procurement.accept_offer", {"supplier": "globex", "price": 8_550})]
    assert KEYS == [("procurement.accept_offer", "accept/task-test/globex/8550.00")]

    async def deny(_ctx: TaskContext, name: str, arguments: dict[str, Any], key: str) -> Any:
        raise _refusal(
            PermissionDenied(
                "denied by policy",
                reason="POLICY_DENIED",
                metadata={"policies": "negotiation-price-cap"},
            )
        )

    refused = TaskContext(
        capability="procurement.negotiation", attempt=1, blackboard=bb, _tool_caller=deny
    )
    with pytest.raises(Aborted) as raised:
        await negotiation(refused)
    assert raised.value.reason == "OFFER_REFUSED"
    assert raised.value.metadata["policies"] == "negotiation-price-cap"


async def test_risk_scores_are_deterministic() -> None:
    customer = {"id": "C-1", "income": 80_000, "transactions": [100, 6_000, {"amount": 9_000}, 5]}
    credit_result = await credit(ctx("risk.credit", customer=customer))
    fraud_result = await fraud(ctx("risk.fraud", customer=customer))
    churn_result = await churn(ctx("risk.churn", customer=customer, fast=True))
    assert credit_result.writes == {"credit_score": pytest.approx(0.2)}
    assert fraud_result.writes == {"fraud_score": 0.5}
    assert churn_result.writes == {"churn_score": 0.25}


def test_churn_is_slow_but_within_its_own_timeout() -> None:
    # The workflow's 1 s task timeout is what cuts it short, not the agent.
    assert churn_agent.capabilities["risk.churn"].timeout_s > 5


async def test_aggregate_reports_missing_scores() -> None:
    full = await aggregate(
        ctx("risk.aggregate", credit_score=0.2, fraud_score=0.5, churn_score=0.2)
    )
    partial = await aggregate(ctx("risk.aggregate", credit_score=0.2, fraud_score=0.5))
    assert full.output == {"overall": 0.3, "missing": []}
    assert partial.output == {"overall": 0.35, "missing": ["churn_score"]}


async def test_billing_refunds_the_amount_the_ticket_names_through_the_tool_proxy() -> None:
    from services.agents.billing.agent import billing

    CALLS.clear()
    result = await billing(ctx("support.billing", ticket=ticket("refund 1500 please")))
    refunds = [args for name, args in CALLS if name == "billing.issue_refund"]
    assert refunds == [
        {
            "customer_id": "C-9",
            "invoice_id": "inv-000001",
            "amount": 1500.0,
            "currency": "EUR",
            "reason": "ticket T-1",
        }
    ]
    assert "refunded 1500.00" in result.writes["billing_notes"]


async def test_billing_without_a_refund_request_moves_no_money() -> None:
    from services.agents.billing.agent import billing

    CALLS.clear()
    await billing(ctx("support.billing", ticket=ticket("wrong invoice address")))
    assert [name for name, _ in CALLS] == ["billing.get_invoices"]


async def test_billing_refunds_under_a_key_its_compensation_can_find() -> None:
    KEYS.clear()
    for attempt in (1, 2):
        result = await billing(
            TaskContext(
                capability="support.billing",
                task_id="triage.1",
                attempt=attempt,
                blackboard={"ticket": ticket("refund 20 please")},
                _tool_caller=answer_tool,
            )
        )
        assert result.writes == {"billing_notes": "customer C-9: refunded 20.00 on inv-000001"}
    assert [k for name, k in KEYS if name == "billing.issue_refund"] == ["refund/triage.1"] * 2
    contract = billing_agent.capabilities["support.billing"].contract
    assert contract.compensation == "support.billing.reverse"


async def test_billing_reverse_reverses_the_refund_of_the_task_it_undoes() -> None:
    CALLS.clear()
    KEYS.clear()
    undo = TaskContext(
        capability="support.billing.reverse",
        task_id="triage.1.undo",
        input={"task_id": "triage.1", "capability": "support.billing", "succeeded": True},
        _tool_caller=answer_tool,
    )
    result = await reverse(undo)
    calls, keys = list(CALLS), list(KEYS)
    assert calls == [
        (
            "billing.reverse_refund",
            {
                "refund_idempotency_key": refund_key("triage.1"),
                "reason": "compensate task triage.1",
            },
        )
    ]
    assert keys == [("billing.reverse_refund", "reverse/triage.1")]
    assert result.output == {
        "task_id": "triage.1",
        "reversed": True,
        "refund_id": "rf-1",
        "reversal_id": "rv-1",
    }
    assert result.writes == {}
    contract = billing_agent.capabilities["support.billing.reverse"].contract
    assert list(contract.tools) == ["billing.reverse_refund"]
    with pytest.raises(InvalidArgument):
        await reverse(TaskContext(capability="support.billing.reverse", input={}))


async def test_cancel_order_cancels_the_order_its_sourcing_task_placed() -> None:
    order = {"supplier": "globex", "price": 8550.0}
    cancelled = await cancel_order(
        TaskContext(
            capability="procurement.cancel_order",
            input={"task_id": "sourcing.2", "succeeded": True, "output": order},
            blackboard={"purchase_order": order},
        )
    )
    assert cancelled.output == {"cancelled": order}
    assert cancelled.writes == {"purchase_order": {**order, "status": "cancelled"}}
    # The first visit only listed suppliers; a failed task placed nothing.
    for output in ({"suppliers": [{"name": "acme", "unit_price": 120}]}, {}):
        nothing = await cancel_order(
            TaskContext(
                capability="procurement.cancel_order",
                input={"task_id": "sourcing", "succeeded": bool(output), "output": output},
                blackboard={"purchase_order": order},
            )
        )
        assert nothing.output == {"cancelled": None}
        assert nothing.writes == {}
    contract = sourcing_agent.capabilities["procurement.sourcing"].contract
    assert contract.compensation == "procurement.cancel_order"
