"""Reading the budget ledger (``tessera.v1.WorkflowBudget``, written by the coordinator):
the one rule every reader applies, so the coordinator and the tool proxy agree on what
is left."""

from __future__ import annotations

from tessera.v1 import budget_pb2

__all__ = ["LEDGER_KEY_PREFIX", "cost_remaining_cents", "ledger_key", "reservation_key"]

LEDGER_KEY_PREFIX = "wf."


def ledger_key(workflow_id: str) -> str:
    """The KV key of a workflow's entry in ``Topology.budgets_bucket``."""
    return LEDGER_KEY_PREFIX + workflow_id


def reservation_key(task_id: str, attempt: int) -> str:
    """The key of one attempt's reservation in ``WorkflowBudget.reserved``."""
    return f"{task_id}#{attempt}"


def cost_remaining_cents(entry: budget_pb2.WorkflowBudget, reservation: str) -> int | None:
    """The cost the attempt holding ``reservation`` may still spend, in cents rounded
    down: the workflow's cost cap minus what is committed and what *other* attempts hold
    (its own slice is its to spend). Never negative; None when no cost cap is set."""
    cap = entry.limits.max_cost_micros
    if cap <= 0:
        return None
    others = sum(u.cost_micros for k, u in entry.reserved.items() if k != reservation)
    return max(0, cap - entry.committed.cost_micros - others) // 10_000
