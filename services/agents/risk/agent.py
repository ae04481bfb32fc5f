"""loan.risk: a risk score and band from the requested amount."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("risk", version="1.0.0")


def band(score: float) -> str:
    return "low" if score < 30 else "medium" if score < 70 else "high"


@agent.capability(
    "loan.risk",
    version="1.0.0",
    side_effect="read_only",
    reads=["application", "documents"],
    writes=["risk_score", "risk_band"],
    tools=["credit.bureau_report"],
    timeout_s=10,
)
async def risk(ctx: TaskContext) -> TaskResult:
    """Score the application: amount / 1000, capped at 100."""
    amount = float((ctx.get("application") or {}).get("amount", 0))
    score = min(amount / 1000, 100.0)
    writes = {"risk_score": score, "risk_band": band(score)}
    return TaskResult(
        output=writes,
        writes=writes,
        summary=f"risk {band(score)} ({score:g})",
        confidence=0.9,
        usage=Usage(tokens=20),
    )
