"""support.synthesis: the reply to the customer, from every specialist's notes."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("synthesis", version="1.0.0")

NOTES = ("billing_notes", "technical_notes", "account_notes")


@agent.capability(
    "support.synthesis",
    version="1.0.0",
    side_effect="idempotent_write",
    reads=["ticket", "category", *NOTES],
    writes=["reply"],
    tools=["email.send"],
    timeout_s=10,
    output_schema={
        "type": "object",
        "required": ["reply"],
        "properties": {"reply": {"type": "string"}},
    },
)
async def synthesis(ctx: TaskContext) -> TaskResult:
    """Write the reply to the customer."""
    ticket = ctx.get("ticket") or {}
    notes = [str(ctx.blackboard[key]) for key in NOTES if ctx.blackboard.get(key)]
    body = " ".join(notes) if notes else "we are looking into it."
    reply = f"Re ticket {ticket.get('id', '?')} ({ctx.get('category', 'general')}): {body}"
    if ticket.get("customer_id"):
        # An external action: the default idempotency key keeps a retry from mailing twice.
        await ctx.call_tool(
            "email.send",
            {
                "to": f"{ticket['customer_id'].lower()}@customers.example",
                "subject": f"Your ticket {ticket.get('id', '')}".strip(),
                "body": reply,
            },
        )
    return TaskResult(
        output={"reply": reply},
        writes={"reply": reply},
        summary="reply drafted",
        confidence=0.9,
        usage=Usage(tokens=len(reply) // 4),
    )
