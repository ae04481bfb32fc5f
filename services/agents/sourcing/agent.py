"""procurement.sourcing: find suppliers, then turn the accepted offer into a purchase order;
procurement.cancel_order, its compensation, cancels that order when the workflow fails or
is cancelled afterwards."""

from typing import Any

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("sourcing", version="1.0.0")

SUPPLIERS = [{"name": "acme", "unit_price": 120}, {"name": "globex", "unit_price": 95}]


@agent.capability(
    "procurement.sourcing",
    version="1.0.0",
    side_effect="idempotent_write",  # places the purchase order
    reads=["item", "quantity", "offer"],
    writes=["suppliers", "purchase_order"],
    handoffs=["procurement.negotiation"],
    compensation="procurement.cancel_order",
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


def placed_order(output: Any) -> dict[str, Any] | None:
    """The purchase order a procurement.sourcing task's output says it placed, if any (a
    first visit only lists suppliers; a failed one placed nothing)."""
    if isinstance(output, dict) and "supplier" in output and "price" in output:
        return {"supplier": output["supplier"], "price": output["price"]}
    return None


@agent.capability(
    "procurement.cancel_order",
    version="1.0.0",
    side_effect="idempotent_write",
    reads=["purchase_order"],
    writes=["purchase_order"],
    timeout_s=10,
)
async def cancel_order(ctx: TaskContext) -> TaskResult:
    """Undo a procurement.sourcing task (its compensation): cancel the purchase order it
    placed. Idempotent; nothing to do for a task that placed none."""
    order = placed_order(ctx.input.get("output"))
    if order is None:
        return TaskResult(
            output={"cancelled": None}, summary="no purchase order to cancel", usage=Usage()
        )
    # The order lives on the blackboard only (no supplier API yet): mark it cancelled
    # there, unless a later order replaced it.
    board = ctx.blackboard.get("purchase_order")
    writes = {}
    if isinstance(board, dict) and placed_order(board) == order:
        writes["purchase_order"] = {**order, "status": "cancelled"}
    return TaskResult(
        output={"cancelled": order},
        writes=writes,
        summary=f"purchase order cancelled: {order['supplier']} at {order['price']:g}",
        usage=Usage(tokens=5),
    )
