"""Task tokens: a Vault child token per dispatched attempt, scoped to exactly the tools
the task may use (the agent's contract ∩ the plan step), revoked when the attempt ends,
and all of a workflow's revoked at once when it ends or is cancelled (the kill switch)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from decimal import Decimal

import structlog
from nats.js import JetStreamContext

from services.coordinator.audit import WorkflowAuditor
from services.coordinator.budget import Amounts
from services.coordinator.engine import Dispatch
from services.coordinator.state import WorkflowRecord
from tessera.budgets import reservation_key
from tessera.runtime.bus import Topology, msg_id_headers
from tessera.runtime.retry import retry_transient
from tessera.v1 import common_pb2, events_pb2, planner_pb2
from tessera.v1.audit_pb2 import AuditKind
from tessera.vault.client import VaultClient
from tessera.vault.tokens import TaskToken

log = structlog.get_logger(__name__)

MAX_USES = 50
TTL_SLACK_S = 5
REVOKED_EVENT_WITHIN_S = 10.0
"""How long a revocation keeps trying to announce itself through a NATS fault (a
leader election); the revocation itself is Vault's and does not wait for it."""


def scoped_tools(contract: common_pb2.CapabilityContract, step_tools: Iterable[str]) -> list[str]:
    return sorted(set(contract.tools) & set(step_tools))


def max_budget_cents(graph: planner_pb2.TaskGraph) -> int | None:
    """The workflow's ``max_budget`` input (the most it may commit to pay, in major
    units, as given at start and kept in the plan's initial blackboard, which no agent
    writes) in cents, rounded DOWN so that rounding never lifts the ceiling; None when
    the plan has none (the policy then refuses any price)."""
    value = graph.blackboard.fields.get("max_budget")
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    number = value.number_value
    if not math.isfinite(number) or number < 0:
        return None
    return math.floor(Decimal(repr(number)) * 100)


class TaskTokens:
    def __init__(
        self,
        vault: VaultClient | None,
        js: JetStreamContext,
        topology: Topology,
        *,
        tiers: Mapping[str, str] | None = None,
        auditor: WorkflowAuditor | None = None,
        budget_ledger: bool = False,
    ) -> None:
        """``budget_ledger``: the runner reserves every attempt's budget in the ledger
        (tokens then name their reservation, and the tool proxy reads the live entry)."""
        self.budget_ledger = budget_ledger
        self.vault = vault
        self.js = js
        self.topology = topology
        self.tiers = dict(tiers or {})
        self.auditor = auditor
        self._pending: set[asyncio.Task[None]] = set()

    def issues(
        self, rec: WorkflowRecord, dispatch: Dispatch, contract: common_pb2.CapabilityContract
    ) -> bool:
        """Whether :meth:`issue` gives this attempt a token (the task may use a tool)."""
        return self.vault is not None and bool(
            scoped_tools(contract, rec.tasks[dispatch.task_id].tools)
        )

    async def issue(
        self,
        rec: WorkflowRecord,
        dispatch: Dispatch,
        contract: common_pb2.CapabilityContract,
        agent: str,
        *,
        reserved: Amounts | None = None,
    ) -> TaskToken | None:
        """None when the task may use no tool (or Vault is not configured).

        The token allows the tool calls ``reserved`` for this attempt from the workflow's
        budget (the budget ledger; a workflow without a tool-call cap, or an attempt with
        no reservation, e.g. a compensation: up to MAX_USES). Its meta carries what the
        tool proxy puts into every policy decision and cannot take from the agent:
        ``reservation`` (the attempt's key in the ledger, whose live entry gives
        ``budget_remaining``) and ``max_budget`` (cents, from the plan's inputs)."""
        if not self.issues(rec, dispatch, contract):
            return None
        assert self.vault is not None
        tools = scoped_tools(contract, rec.tasks[dispatch.task_id].tools)
        graph = rec.graph()
        budget = graph.budget
        if reserved is not None and budget.max_tool_calls > 0:
            uses = reserved.tool_calls
        elif budget.max_tool_calls:
            uses = budget.max_tool_calls - rec.usage.tool_calls
        else:
            uses = MAX_USES
        meta = {
            "workflow": rec.id,
            "task": dispatch.task_id,
            "agent": agent,
            "tier": self.tiers.get(agent, "standard"),
        }
        if self.budget_ledger:
            meta["reservation"] = reservation_key(dispatch.task_id, dispatch.attempt)
        ceiling = max_budget_cents(graph)
        if ceiling is not None:
            meta["max_budget"] = str(ceiling)
        return await self.vault.create_task_token(
            tools=tools,
            ttl_s=math.ceil(dispatch.timeout_s) + TTL_SLACK_S,
            num_uses=max(1, min(uses, MAX_USES)),
            meta=meta,
        )

    def revoke_soon(self, wf_id: str, accessors: Iterable[str], reason: str) -> None:
        """Revoke without holding up the workflow; failures are logged (tokens expire
        with their task's deadline anyway)."""
        wanted = [a for a in accessors if a]
        if not wanted or self.vault is None:
            return
        task = asyncio.create_task(self.revoke(wf_id, wanted, reason))
        self._pending.add(task)
        task.add_done_callback(self._revoked)

    def _revoked(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("task_token_revocation_incomplete", error=repr(exc))

    async def revoke(self, wf_id: str, accessors: Iterable[str], reason: str) -> None:
        wanted = sorted({a for a in accessors if a})
        if not wanted or self.vault is None:
            return
        revoked = []
        for accessor in wanted:
            try:
                await self.vault.revoke_accessor(accessor)
                revoked.append(accessor)
            except Exception as exc:  # Vault down: the token still dies at its TTL
                log.warning("task_token_revoke_failed", workflow_id=wf_id, error=repr(exc))
        event = events_pb2.TokenRevoked(accessors=wanted, workflow_id=wf_id, reason=reason)
        event.time.FromMicroseconds(int(time.time() * 1e6))
        # Published even if Vault could not be reached: proxies evict the tokens at once.
        # The message id makes a retried (or concurrent, identical) revocation one event.
        headers = msg_id_headers(
            "revoked-" + hashlib.sha256("|".join(wanted).encode()).hexdigest()[:32]
        )
        try:
            await retry_transient(
                lambda: self.js.publish(
                    self.topology.events_subject("token.revoked"),
                    event.SerializeToString(),
                    headers=headers,
                ),
                within_s=REVOKED_EVENT_WITHIN_S,
                what="token revoked event",
            )
        except Exception as exc:  # proxies still refuse the tokens once Vault says so
            log.warning("token_revoked_event_not_published", workflow_id=wf_id, error=repr(exc))
        if self.auditor is not None:
            await self.auditor.record(
                AuditKind.AUDIT_KIND_TOKEN_REVOKED,
                workflow_id=wf_id,
                outcome="revoked" if revoked else "revoke_failed",
                resource=f"workflows/{wf_id}",
                details={"accessors": wanted, "reason": reason},
            )
        log.info("task_tokens_revoked", workflow_id=wf_id, count=len(revoked), reason=reason)

    async def drain(self) -> None:
        """Let the revocations under way finish (they write audit records)."""
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self.vault is not None:
            await self.vault.close()
