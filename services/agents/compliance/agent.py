"""loan.compliance: AML screening; a flagged application waits for a human's approval."""

from tessera.agent import Agent, TaskContext, TaskResult, Usage

agent = Agent("compliance", version="1.0.0")

HIGH_RISK_COUNTRIES = frozenset({"XX", "KP", "IR"})
AML_AMOUNT = 1_000_000


def aml_reasons(application: dict) -> list[str]:
    reasons = []
    if str(application.get("country", "")).upper() in HIGH_RISK_COUNTRIES:
        reasons.append(f"country {application['country']}")
    if float(application.get("amount", 0)) >= AML_AMOUNT:
        reasons.append(f"amount {application['amount']:g} >= {AML_AMOUNT:,}")
    return reasons


@agent.capability(
    "loan.compliance",
    version="1.0.0",
    side_effect="read_only",
    reads=["application", "risk_band"],
    writes=["compliance"],
    approval="conditional",
    timeout_s=10,
)
async def compliance(ctx: TaskContext) -> TaskResult:
    """Screen the application for AML risk; flagged ones need a human's approval."""
    reasons = aml_reasons(ctx.get("application") or {})
    # The decision takes effect only once a flagged application's gate is approved.
    result = {"aml_flag": bool(reasons), "decision": "approved"}
    return TaskResult(
        output=result,
        writes={"compliance": result},
        usage=Usage(tokens=30),
        summary="AML flag raised" if reasons else "no AML concern",
        approval_request=f"AML risk: {', '.join(reasons)}" if reasons else None,
    )
