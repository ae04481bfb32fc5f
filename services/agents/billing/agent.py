"""support.billing: billing notes for a ticket (the "ping-pong" ticket bounces to account)."""

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("billing", version="1.0.0")


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
    refund = "refund" in text.lower()
    notes = f"customer {ticket.get('customer_id', '?')}: " + (
        "refund of the last invoice approved" if refund else "invoices reviewed"
    )
    return TaskResult(
        output={"billing_notes": notes},
        writes={"billing_notes": notes},
        summary=notes,
        confidence=0.9,
        usage=usage,
    )
