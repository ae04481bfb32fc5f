"""support.billing: billing notes for a ticket (the "ping-pong" ticket bounces to account)."""

import re

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("billing", version="1.0.0")


def requested_amount(text: str) -> float | None:
    """The amount a ticket asks for ("refund 1500"), if it names one."""
    match = re.search(r"\b(\d{1,6}(?:\.\d{1,2})?)\b", text)
    return float(match.group(1)) if match else None


@agent.capability(
    "support.billing",
    version="1.0.0",
    side_effect="idempotent_write",
    reads=["ticket", "category"],
    writes=["billing_notes"],
    tools=["billing.get_invoices", "billing.issue_refund"],
    handoffs=["support.account"],
    timeout_s=10,
)
async def billing(ctx: TaskContext) -> TaskResult:
    """Review the customer's invoices and note what to do about the ticket."""
    ticket = ctx.get("ticket") or {}
    text = str(ticket.get("text", ""))
    usage = Usage(tokens=len(text) // 4)
    if "ping-pong" in text.lower():
        # The loop ticket: route on without changing the blackboard.
        return TaskResult(
            summary="needs the account team",
            usage=usage,
            handoff=Handoff("support.account", reason="account question"),
        )
    customer_id = str(ticket.get("customer_id", "unknown"))
    invoices = await ctx.call_tool("billing.get_invoices", {"customer_id": customer_id, "limit": 1})
    refund = "refund" in text.lower()
    notes = f"customer {customer_id}: invoices reviewed"
    if refund:
        invoice = invoices["invoices"][0]
        amount = requested_amount(text) or invoice["amount"] or 1.0
        # Moves money: the policy service requires a human approval above 1,000, and the
        # idempotency key (stable across attempts) makes sure it happens once.
        await ctx.call_tool(
            "billing.issue_refund",
            {
                "customer_id": customer_id,
                "invoice_id": invoice["invoice_id"],
                "amount": amount,
                "currency": invoice["currency"],
                "reason": f"ticket {ticket.get('id', '?')}",
            },
        )
        notes = f"customer {customer_id}: refunded {amount:.2f} on {invoice['invoice_id']}"
    return TaskResult(
        output={"billing_notes": notes},
        writes={"billing_notes": notes},
        summary=notes,
        confidence=0.9,
        usage=usage,
    )
