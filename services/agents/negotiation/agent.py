"""procurement.negotiation: an offer; the first attempt asks list price, later ones push
the cheapest supplier to a 10 % discount. The offer is accepted through the governed
``procurement.accept_offer`` tool: the policy (``negotiation-price-cap``) refuses a price
above the workflow's ``max_budget``, and the attempt fails retryably so the next one
renegotiates."""

import grpc

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage
from tessera.runtime.errors import Aborted, FailedPrecondition, error_details

agent = Agent("negotiation", version="1.0.0")

DISCOUNT = 0.10
ACCEPT_OFFER = "procurement.accept_offer"


def make_offer(suppliers: list[dict], quantity: float, attempt: int) -> dict:
    if attempt <= 1:
        first = suppliers[0]
        return {"supplier": first["name"], "price": first["unit_price"] * quantity}
    cheapest = min(suppliers, key=lambda s: s["unit_price"])
    price = round(cheapest["unit_price"] * quantity * (1 - DISCOUNT), 2)
    return {"supplier": cheapest["name"], "price": price}


def acceptance_key(task_id: str, offer: dict) -> str:
    """One acceptance per offer: a re-run of the same offer replays it, a new offer (a
    later attempt's) is a new call."""
    return f"accept/{task_id}/{offer['supplier']}/{offer['price']:.2f}"


@agent.capability(
    "procurement.negotiation",
    version="1.0.0",
    side_effect="read_only",
    reads=["suppliers", "quantity", "max_budget"],
    writes=["offer"],
    tools=[ACCEPT_OFFER],
    handoffs=["procurement.sourcing"],
    timeout_s=10,
)
async def negotiation(ctx: TaskContext) -> TaskResult:
    """Negotiate an offer with the listed suppliers and accept it."""
    suppliers = ctx.get("suppliers")
    if not suppliers:
        raise FailedPrecondition("no suppliers on the blackboard", reason="NO_SUPPLIERS")
    offer = make_offer(suppliers, float(ctx.get("quantity", 1)), ctx.attempt)
    try:
        await ctx.call_tool(
            ACCEPT_OFFER,
            {"supplier": offer["supplier"], "price": offer["price"]},
            idempotency_key=acceptance_key(ctx.task_id, offer),
        )
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        if details.reason != "POLICY_DENIED":
            raise
        # Refused by policy (over max_budget): this attempt fails, the next one haggles.
        raise Aborted(
            f"offer of {offer['price']:g} from {offer['supplier']} refused by policy",
            reason="OFFER_REFUSED",
            metadata={"policies": details.metadata.get("policies", "")},
        ) from None
    return TaskResult(
        output=offer,
        writes={"offer": offer},
        usage=Usage(tokens=40),
        summary=f"offer from {offer['supplier']} accepted: {offer['price']:g}",
        handoff=Handoff("procurement.sourcing", reason="offer accepted"),
    )
