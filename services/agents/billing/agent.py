"""support.billing: billing notes for a ticket (the "ping-pong" ticket bounces to account),
and support.billing.reverse, its compensation: the refund it made is reversed when the
workflow fails or is cancelled afterwards."""

import re

from tessera.agent import Agent, Handoff, TaskContext, TaskResult, Usage
from tessera.runtime.errors import InvalidArgument

agent = Agent("billing", version="1.0.0")


def refund_key(task_id: str) -> str:
    """The idempotency key of the refund task ``task_id`` makes: the same in every attempt
    of the task, so the refund happens once, and known to its compensation."""
    return f"refund/{task_id}"


def requested_amount(text: str) -> float | None:
    """The amount a ticket asks for ("refund 1500"), if it names one."""
    match = re.search(r"\b(\d{1,6}(?:\.\d{1,2})?)\b", text)
    return float(match.group(1)) if match else None


@agent.capability(
    "support.billing",
    version="1.0.0",
    side_effect="idempotent_write",
    reads=["ticket", "category"],
    writes=["billing_notes"],
    tools=["billing.get_invoices", "billing.issue_refund"],
    handoffs=["support.account"],
    compensation="support.billing.reverse",
    timeout_s=10,
)
async def billing(ctx: TaskContext) -> TaskResult:
    """Review the customer's invoices and note what to do about the ticket."""
    ticket = ctx.get("ticket") or {}
    text = str(ticket.get("text", ""))
    usage = Usage(tokens=len(text) // 4)
    if "ping-pong" in text.lower():
        # The loop ticket: route on without changing the blackboard.
        return TaskResult(
            summary="needs the account team",
            usage=usage,
            handoff=Handoff("support.account", reason="account question"),
        )
    customer_id = str(ticket.get("customer_id", "unknown"))
    invoices = await ctx.call_tool("billing.get_invoices", {"customer_id": customer_id, "limit": 1})
    refund = "refund" in text.lower()
    notes = f"customer {customer_id}: invoices reviewed"
    if refund:
        invoice = invoices["invoices"][0]
        amount = requested_amount(text) or invoice["amount"] or 1.0
        # Moves money: the policy service requires a human approval above 1,000, and the
        # idempotency key (stable across attempts) makes sure it happens once; the
        # compensation finds the refund by the same key.
        await ctx.call_tool(
            "billing.issue_refund",
            {
                "customer_id": customer_id,
                "invoice_id": invoice["invoice_id"],
                "amount": amount,
                "currency": invoice["currency"],
                "reason": f"ticket {ticket.get('id', '?')}",
            },
            idempotency_key=refund_key(ctx.task_id),
        )
        notes = f"customer {customer_id}: refunded {amount:.2f} on {invoice['invoice_id']}"
    return TaskResult(
        output={"billing_notes": notes},
        writes={"billing_notes": notes},
        summary=notes,
        confidence=0.9,
        usage=usage,
    )


@agent.capability(
    "support.billing.reverse",
    version="1.0.0",
    side_effect="idempotent_write",
    tools=["billing.reverse_refund"],
    timeout_s=10,
)
async def reverse(ctx: TaskContext) -> TaskResult:
    """Undo a support.billing task (its compensation): reverse the refund it made, if it
    made one. Idempotent: the tool reverses a refund once, and records nothing where no
    refund was made (a ticket that asked none, or a task that stopped before it)."""
    task_id = ctx.input.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise InvalidArgument(
            "support.billing.reverse needs the task_id of the support.billing task it undoes",
            reason="COMPENSATION_INPUT_INVALID",
            field_violations=[("input.task_id", "the id of the task to undo")],
        )
    answer = await ctx.call_tool(
        "billing.reverse_refund",
        {"refund_idempotency_key": refund_key(task_id), "reason": f"compensate task {task_id}"},
        idempotency_key=f"reverse/{task_id}",
    )
    reversed_ = bool(answer.get("reversed"))
    output = {
        "task_id": task_id,
        "reversed": reversed_,
        "refund_id": answer.get("refund_id"),
        "reversal_id": answer.get("reversal_id"),
    }
    summary = (
        f"refund {answer.get('refund_id')} reversed"
        if reversed_
        else f"nothing to reverse: {answer.get('reason', 'no refund was made')}"
    )
    return TaskResult(output=output, summary=summary, usage=Usage(tokens=10))
