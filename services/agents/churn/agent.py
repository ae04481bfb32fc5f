"""risk.churn: churn risk; deliberately slow (5 s) unless the input says ``fast: true``."""

import asyncio

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("churn", version="1.0.0")

SLOW_S = 5.0


@agent.capability(
    "risk.churn",
    version="1.0.0",
    side_effect="read_only",
    reads=["customer", "fast"],
    writes=["churn_score"],
    timeout_s=SLOW_S + 5,
)
async def churn(ctx: TaskContext) -> TaskResult:
    """Score the customer's churn risk (the slow branch of the risk workflow)."""
    if not ctx.get("fast"):
        await asyncio.sleep(SLOW_S)
    transactions = (ctx.get("customer") or {}).get("transactions") or []
    score = 0.25 if transactions else 0.6
    return TaskResult(
        output={"churn_score": score},
        writes={"churn_score": score},
        summary=f"churn risk {score:g}",
        usage=Usage(tokens=15),
    )
