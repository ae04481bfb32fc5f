"""risk.fraud: fraud risk in [0, 1], the share of large transactions."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("fraud", version="1.0.0")

LARGE = 5_000


def amount(transaction: object) -> float:
    if isinstance(transaction, dict):
        return float(transaction.get("amount", 0))
    return float(transaction)  # type: ignore[arg-type]


@agent.capability(
    "risk.fraud",
    version="1.0.0",
    side_effect="read_only",
    reads=["customer"],
    writes=["fraud_score"],
    timeout_s=10,
)
async def fraud(ctx: TaskContext) -> TaskResult:
    """Score the customer's fraud risk from their transactions."""
    transactions = (ctx.get("customer") or {}).get("transactions") or []
    large = sum(1 for t in transactions if amount(t) >= LARGE)
    score = round(large / len(transactions), 3) if transactions else 0.0
    return TaskResult(
        output={"fraud_score": score},
        writes={"fraud_score": score},
        summary=f"{large} large of {len(transactions)} transactions",
        usage=Usage(tokens=10 + len(transactions)),
    )
