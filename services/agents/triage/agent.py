"""support.triage: classify a ticket by keywords and route it to the right specialist."""

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("triage", version="1.0.0")

# First match wins, in this order.
KEYWORDS = {
    "billing": ("refund", "invoice", "charge"),
    "technical": ("error", "crash", "bug"),
    "account": ("password", "login", "account"),
}


def categorize(text: str) -> str | None:
    lowered = text.lower()
    for category, words in KEYWORDS.items():
        if any(word in lowered for word in words):
            return category
    return None


@agent.capability(
    "support.triage",
    version="1.0.0",
    side_effect="read_only",
    reads=["ticket"],
    writes=["category"],
    tools=["crm.lookup_customer"],
    handoffs=["support.billing", "support.technical", "support.account"],
    timeout_s=10,
)
async def triage(ctx: TaskContext) -> TaskResult:
    """Categorize a support ticket and hand it to the matching specialist."""
    ticket = ctx.get("ticket") or {}
    text = str(ticket.get("text", ""))
    category = categorize(text)
    if ticket.get("customer_id"):
        # Governed: the tool proxy checks this task's token and asks the policy service.
        customer = await ctx.call_tool(
            "crm.lookup_customer", {"customer_id": str(ticket["customer_id"])}
        )
        ctx.log.info("customer_found", tier=customer.get("tier"))
    usage = Usage(tokens=len(text) // 4)
    if category is None:
        return TaskResult(
            output={"category": "general"},
            writes={"category": "general"},
            summary="no specialist keyword",
            confidence=0.5,
            usage=usage,
        )
    return TaskResult(
        output={"category": category},
        writes={"category": category},
        summary=f"ticket is a {category} issue",
        confidence=0.9,
        usage=usage,
        handoff=Handoff(f"support.{category}", reason=f"keywords say {category}"),
    )
