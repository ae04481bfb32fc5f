"""support.account: account notes for a ticket (the "ping-pong" ticket bounces to billing)."""

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("account", version="1.0.0")


@agent.capability(
    "support.account",
    version="1.0.0",
    side_effect="read_only",
    reads=["ticket", "category"],
    writes=["account_notes"],
    tools=["crm.lookup_customer"],
    handoffs=["support.billing"],
    timeout_s=10,
)
async def account(ctx: TaskContext) -> TaskResult:
    """Check the customer's account and note what to do about the ticket."""
    ticket = ctx.get("ticket") or {}
    text = str(ticket.get("text", ""))
    usage = Usage(tokens=len(text) // 4)
    if "ping-pong" in text.lower():
        return TaskResult(
            summary="needs the billing team",
            usage=usage,
            handoff=Handoff("support.billing", reason="billing question"),
        )
    notes = f"customer {ticket.get('customer_id', '?')}: password reset link sent"
    return TaskResult(
        output={"account_notes": notes},
        writes={"account_notes": notes},
        summary=notes,
        confidence=0.9,
        usage=usage,
    )
