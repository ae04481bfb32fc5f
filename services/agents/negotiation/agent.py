"""procurement.negotiation: an offer; the first attempt asks list price, later ones push
the cheapest supplier to a 10 % discount."""

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage
from tessera.runtime.errors import FailedPrecondition

agent = Agent("negotiation", version="1.0.0")

DISCOUNT = 0.10


def make_offer(suppliers: list[dict], quantity: float, attempt: int) -> dict:
    if attempt <= 1:
        first = suppliers[0]
        return {"supplier": first["name"], "price": first["unit_price"] * quantity}
    cheapest = min(suppliers, key=lambda s: s["unit_price"])
    price = round(cheapest["unit_price"] * quantity * (1 - DISCOUNT), 2)
    return {"supplier": cheapest["name"], "price": price}


@agent.capability(
    "procurement.negotiation",
    version="1.0.0",
    side_effect="read_only",
    reads=["suppliers", "quantity", "max_budget"],
    writes=["offer"],
    handoffs=["procurement.sourcing"],
    timeout_s=10,
)
async def negotiation(ctx: TaskContext) -> TaskResult:
    """Negotiate an offer with the listed suppliers."""
    suppliers = ctx.get("suppliers")
    if not suppliers:
        raise FailedPrecondition("no suppliers on the blackboard", reason="NO_SUPPLIERS")
    offer = make_offer(suppliers, float(ctx.get("quantity", 1)), ctx.attempt)
    return TaskResult(
        output=offer,
        writes={"offer": offer},
        usage=Usage(tokens=40),
        summary=f"offer from {offer['supplier']}: {offer['price']:g}",
        handoff=Handoff("procurement.sourcing", reason="offer ready"),
    )
