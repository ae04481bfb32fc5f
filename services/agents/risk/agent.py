"""loan.risk: a risk score and band from the requested amount."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("risk", version="1.0.0")


def band(score: float) -> str:
    return "low" if score < 30 else "medium" if score < 70 else "high"


def applicant_id(application: dict[str, object]) -> str:
    """A bureau-safe identifier for the applicant."""
    slug = "".join(c for c in str(application.get("applicant", "applicant")) if c.isalnum())
    return (slug or "applicant")[:64]


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
    application = ctx.get("application") or {}
    amount = float(application.get("amount", 0))
    # PII: only compliance-tier agents may read bureau reports (policy/40_pii.cedar).
    await ctx.call_tool("credit.bureau_report", {"customer_id": applicant_id(application)})
    score = min(amount / 1000, 100.0)
    writes = {"risk_score": score, "risk_band": band(score)}
    return TaskResult(
        output=writes,
        writes=writes,
        summary=f"risk {band(score)} ({score:g})",
        confidence=0.9,
        usage=Usage(tokens=20),
    )
