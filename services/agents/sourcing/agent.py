"""procurement.sourcing: find suppliers, then turn the accepted offer into a purchase order."""

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("sourcing", version="1.0.0")

SUPPLIERS = [{"name": "acme", "unit_price": 120}, {"name": "globex", "unit_price": 95}]


@agent.capability(
    "procurement.sourcing",
    version="1.0.0",
    side_effect="read_only",
    reads=["item", "quantity", "offer"],
    writes=["suppliers", "purchase_order"],
    handoffs=["procurement.negotiation"],
    timeout_s=10,
)
async def sourcing(ctx: TaskContext) -> TaskResult:
    """List suppliers for the item, or order from the supplier whose offer was accepted."""
    offer = ctx.blackboard.get("offer")
    if not offer:
        return TaskResult(
            output={"suppliers": SUPPLIERS},
            writes={"suppliers": SUPPLIERS},
            summary=f"{len(SUPPLIERS)} suppliers for {ctx.get('item', '?')}",
            usage=Usage(tokens=25),
            handoff=Handoff("procurement.negotiation", reason="negotiate a price"),
        )
    order = {"supplier": offer["supplier"], "price": offer["price"]}
    return TaskResult(
        output=order,
        writes={"purchase_order": order},
        usage=Usage(tokens=15),
        summary=f"purchase order: {order['supplier']} at {order['price']:g}",
    )
