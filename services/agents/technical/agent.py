"""support.technical: technical notes for a ticket."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("technical", version="1.0.0")


@agent.capability(
    "support.technical",
    version="1.0.0",
    side_effect="read_only",
    reads=["ticket", "category"],
    writes=["technical_notes"],
    tools=["kb.search"],
    timeout_s=10,
)
async def technical(ctx: TaskContext) -> TaskResult:
    """Match the ticket against known issues and note the fix."""
    ticket = ctx.get("ticket") or {}
    text = str(ticket.get("text", ""))
    hits = await ctx.call_tool("kb.search", {"query": text[:500] or "help", "top_k": 1})
    fix = "restart the app after updating" if "crash" in text.lower() else "collect logs"
    if hits.get("hits"):
        fix += f" (see {hits['hits'][0]['id']})"
    notes = f"ticket {ticket.get('id', '?')}: {fix}"
    return TaskResult(
        output={"technical_notes": notes},
        writes={"technical_notes": notes},
        summary=notes,
        confidence=0.8,
        usage=Usage(tokens=len(text) // 4),
    )
