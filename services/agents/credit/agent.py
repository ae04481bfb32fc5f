"""risk.credit: credit risk in [0, 1] from income (higher income, lower risk)."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("credit", version="1.0.0")

FULL_CREDIT_INCOME = 100_000


@agent.capability(
    "risk.credit",
    version="1.0.0",
    side_effect="read_only",
    reads=["customer"],
    writes=["credit_score"],
    tools=["credit.bureau_report"],
    timeout_s=10,
)
async def credit(ctx: TaskContext) -> TaskResult:
    """Score the customer's credit risk."""
    customer = ctx.get("customer") or {}
    income = float(customer.get("income", 0))
    await ctx.call_tool("credit.bureau_report", {"customer_id": str(customer.get("id", "0"))})
    score = round(1 - min(max(income, 0), FULL_CREDIT_INCOME) / FULL_CREDIT_INCOME, 3)
    return TaskResult(
        output={"credit_score": score},
        writes={"credit_score": score},
        summary=f"credit risk {score:g}",
        usage=Usage(tokens=20),
    )
