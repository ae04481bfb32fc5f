"""risk.aggregate: overall risk from the scores that arrived, naming the missing ones."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("aggregator", version="1.0.0")

SCORES = ("credit_score", "fraud_score", "churn_score")


@agent.capability(
    "risk.aggregate",
    version="1.0.0",
    side_effect="read_only",
    reads=list(SCORES),
    timeout_s=10,
    output_schema={"type": "object", "required": ["overall", "missing"]},
)
async def aggregate(ctx: TaskContext) -> TaskResult:
    """Average the available risk scores (a partial result when some are missing)."""
    present = {k: float(ctx.blackboard[k]) for k in SCORES if ctx.blackboard.get(k) is not None}
    missing = [k for k in SCORES if k not in present]
    overall = round(sum(present.values()) / len(present), 3) if present else None
    return TaskResult(
        output={"overall": overall, "missing": missing},
        summary=f"overall {overall} from {len(present)} of {len(SCORES)} scores",
        confidence=round(len(present) / len(SCORES), 3),
        usage=Usage(tokens=10),
    )
