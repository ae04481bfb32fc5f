"""The live ``budget_remaining`` of a tool call's policy decision, read from the
coordinator's budget ledger (``tessera.v1.WorkflowBudget`` in ``<ns>_budgets``; the
coordinator is its only writer, this proxy only reads it).

A task token from a coordinator that keeps the ledger names its attempt's reservation in
its meta (``reservation``); the value is then what the workflow's budget has left for
that attempt at the moment of the call (:func:`tessera.budgets.cost_remaining_cents`),
not a number frozen when the token was issued. Fail closed: an unreadable ledger refuses
the call (UNAVAILABLE), a missing entry (the workflow ended) reads as nothing left.
"""

from __future__ import annotations

import structlog
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.tool_proxy.tokens import VerifiedToken
from tessera.budgets import cost_remaining_cents, ledger_key
from tessera.runtime.errors import Unavailable
from tessera.v1 import budget_pb2

__all__ = ["RESERVATION_META", "LiveBudgets"]

log = structlog.get_logger(__name__)

RESERVATION_META = "reservation"


class LiveBudgets:
    def __init__(self, kv: KeyValue | None, *, default_cents: int) -> None:
        self.kv = kv
        self.default_cents = default_cents

    async def remaining_cents(self, verified: VerifiedToken) -> int:
        """``context.budget_remaining`` for a call made with ``verified``."""
        meta = verified.info.meta
        reservation = meta.get(RESERVATION_META)
        if reservation is None or self.kv is None:
            # A token issued without a ledger: its frozen meta value, if any.
            return _int(meta.get("budget_remaining"), self.default_cents)
        try:
            entry = await self.kv.get(ledger_key(verified.workflow))
        except KeyNotFoundError:
            return 0
        except Exception as exc:
            log.warning("budget_ledger_unreadable", error=repr(exc))
            raise Unavailable(
                "cannot read the workflow's budget: the call is refused",
                reason="BUDGET_UNAVAILABLE",
                retry_after_s=0.5,
            ) from None
        if not entry.value:
            return 0
        left = cost_remaining_cents(budget_pb2.WorkflowBudget.FromString(entry.value), reservation)
        return self.default_cents if left is None else left


def _int(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return default
