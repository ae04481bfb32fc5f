"""loan.document_analysis and loan.clarification: verify the applicant's documents, asking
for the tax id first when it is missing."""

import hashlib
import json

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage

agent = Agent("document-analysis", version="1.0.0")


def derive_tax_id(applicant: object) -> str:
    """Deterministic stand-in for asking the applicant: "TIN-" + 6 hex of sha256."""
    text = applicant if isinstance(applicant, str) else json.dumps(applicant, sort_keys=True)
    return "TIN-" + hashlib.sha256(text.encode()).hexdigest()[:6]


@agent.capability(
    "loan.document_analysis",
    version="1.0.0",
    side_effect="read_only",
    reads=["application", "tax_id"],
    writes=["documents"],
    handoffs=["loan.clarification"],
    timeout_s=10,
)
async def document_analysis(ctx: TaskContext) -> TaskResult:
    """Verify the application's documents; needs a tax id."""
    application = ctx.get("application") or {}
    tax_id = application.get("tax_id") or ctx.blackboard.get("tax_id")
    usage = Usage(tokens=len(json.dumps(application)) // 4)
    if not tax_id:
        return TaskResult(
            summary="tax id missing",
            usage=usage,
            handoff=Handoff("loan.clarification", reason="tax id missing"),
        )
    documents = {"verified": True, "tax_id": tax_id}
    return TaskResult(
        output=documents,
        writes={"documents": documents},
        summary="documents verified",
        confidence=0.95,
        usage=usage,
    )


@agent.capability(
    "loan.clarification",
    version="1.0.0",
    side_effect="read_only",
    reads=["application"],
    writes=["tax_id"],
    handoffs=["loan.document_analysis"],
    timeout_s=10,
)
async def clarification(ctx: TaskContext) -> TaskResult:
    """Obtain the applicant's missing tax id."""
    application = ctx.get("application") or {}
    tax_id = derive_tax_id(application.get("applicant", ""))
    return TaskResult(
        output={"tax_id": tax_id},
        writes={"tax_id": tax_id},
        summary="tax id obtained",
        usage=Usage(tokens=len(json.dumps(application)) // 4),
        handoff=Handoff("loan.document_analysis", reason="tax id provided"),
    )
