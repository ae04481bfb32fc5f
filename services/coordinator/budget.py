"""The workflow budget ledger: tool calls, model tokens and cost, reserved before the work,
committed after it, released when it fails (docs/decisions.md, "Budgets are reserved").

The ledger is part of the workflow's state (:func:`ledger_state`): the plan's limits,
what finished attempts consumed, and each running attempt's slice, recorded in its
TaskDispatched before it is sent. The hierarchy is workflow → task → call:

- workflow → task: :meth:`TaskBudgets.reserve` before an attempt is dispatched takes a
  slice out of what the workflow has left; one replica advances a workflow at a time
  (its history is fenced), and the attempts dispatched together reserve one after the
  other from the same state, so parallel tasks can never hold more than the budget.
- task → call: the attempt's task token allows exactly its reserved tool calls; the
  tool proxy's use ledger spends one per executed call (services/tool_proxy/tokens.py).
- an answered attempt's usage is committed, and the rest of its slice freed, by the
  TaskSucceeded that records it; a failed attempt's slice is freed by its TaskFailed.

For attempts that get a task token, the entry is mirrored into the KV bucket
``<ns>_budgets`` (:class:`BudgetMirror`; the coordinator is its only writer), where the
tool proxy reads the live ``budget_remaining`` it puts into every policy decision. The
arithmetic (:class:`BudgetState`) is pure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.coordinator.state import TS, WorkflowRecord
from tessera.budgets import cost_remaining_cents, ledger_key, reservation_key
from tessera.runtime.errors import ResourceExhausted, Unavailable
from tessera.v1 import budget_pb2, common_pb2

__all__ = [
    "Amounts",
    "BudgetExhausted",
    "BudgetMirror",
    "BudgetState",
    "TaskBudgets",
    "fair_share",
    "ledger_state",
]

log = structlog.get_logger(__name__)

_CAS_ATTEMPTS = 32
_BACKOFF_S = 0.002
_DIMENSIONS = ("tool_calls", "tokens", "cost_micros")


@dataclass(frozen=True)
class Amounts:
    """An amount of each budget dimension (a limit of 0 means "no cap")."""

    tool_calls: int = 0
    tokens: int = 0
    cost_micros: int = 0

    @classmethod
    def of(cls, value: common_pb2.Budget | common_pb2.Usage | Mapping[str, Any]) -> Amounts:
        if isinstance(value, common_pb2.Budget):
            return cls(value.max_tool_calls, value.max_tokens, value.max_cost_micros)
        if isinstance(value, common_pb2.Usage):
            return cls(value.tool_calls, value.tokens, value.cost_micros)
        return cls(*(int(value.get(d, 0)) for d in _DIMENSIONS))

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(*(getattr(self, d) + getattr(other, d) for d in _DIMENSIONS))

    def __sub__(self, other: Amounts) -> Amounts:
        return Amounts(*(getattr(self, d) - getattr(other, d) for d in _DIMENSIONS))

    def as_dict(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in _DIMENSIONS}

    def as_usage(self) -> common_pb2.Usage:
        return common_pb2.Usage(**self.as_dict())

    def exceeding(self, limit: Amounts, capped: Amounts) -> list[str]:
        """The dimensions ``capped`` caps in which ``self`` is above ``limit``."""
        return [
            d
            for d in _DIMENSIONS
            if getattr(capped, d) > 0 and getattr(self, d) > getattr(limit, d)
        ]


class BudgetExhausted(ResourceExhausted):
    """No slice of the workflow's budget is left for the attempt. ``held`` is True when
    running attempts hold reservations (a retry after they settle may succeed)."""

    def __init__(self, message: str, *, held: bool) -> None:
        super().__init__(message, reason="BUDGET_EXHAUSTED", retry_after_s=0.2 if held else None)
        self.held = held


@dataclass(frozen=True)
class BudgetState:
    """One workflow's ledger entry (pure values; every operation returns a new state)."""

    limits: Amounts
    committed: Amounts = Amounts()
    reserved: Mapping[str, Amounts] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------
    def held(self, *, excluding: str = "") -> Amounts:
        total = Amounts()
        for key, amounts in self.reserved.items():
            if key != excluding:
                total = total + amounts
        return total

    def available(self, *, excluding: str = "") -> Amounts:
        """What is neither committed nor reserved (by attempts other than
        ``excluding``), per capped dimension; uncapped dimensions read 0."""
        left = self.limits - self.committed - self.held(excluding=excluding)
        return Amounts(
            *(max(0, getattr(left, d)) if getattr(self.limits, d) > 0 else 0 for d in _DIMENSIONS)
        )

    def cost_remaining_cents(self, key: str) -> int | None:
        """What the tool proxy puts in ``context.budget_remaining`` for attempt ``key``
        (:func:`tessera.budgets.cost_remaining_cents`)."""
        return cost_remaining_cents(self.to_proto(""), key)

    # -- changing --------------------------------------------------------------------
    def reserve(self, key: str, want: Amounts, *, minimum: Amounts = Amounts()) -> BudgetState:
        """Reserve up to ``want`` in each capped dimension (what is left, when less), and
        at least ``minimum``; an existing reservation of ``key`` is kept as it is. Raises
        :class:`BudgetExhausted` when a capped dimension has less than ``minimum`` left."""
        if key in self.reserved:
            return self
        free = self.available()
        held = self.held()
        for d in _DIMENSIONS:
            cap = getattr(self.limits, d)
            if cap > 0 and getattr(free, d) < getattr(minimum, d):
                raise BudgetExhausted(
                    f"{d} budget exhausted: {getattr(self.committed, d)} used and "
                    f"{getattr(held, d)} reserved by running tasks, of {cap}",
                    held=getattr(held, d) > 0,
                )
        grant = Amounts(
            *(
                min(max(getattr(want, d), getattr(minimum, d)), getattr(free, d))
                if getattr(self.limits, d) > 0
                else 0
                for d in _DIMENSIONS
            )
        )
        return replace(self, reserved={**self.reserved, key: grant})

    def commit(self, key: str, used: Amounts) -> BudgetState:
        """Record what attempt ``key`` consumed and free the rest of its slice (its usage
        is committed even when above the slice: it was spent). No-op for an unknown key
        (already settled)."""
        if key not in self.reserved:
            return self
        reserved = {k: v for k, v in self.reserved.items() if k != key}
        return replace(self, committed=self.committed + used, reserved=reserved)

    def release(self, key: str) -> BudgetState:
        """Free attempt ``key``'s whole slice (it failed). No-op for an unknown key."""
        if key not in self.reserved:
            return self
        return replace(self, reserved={k: v for k, v in self.reserved.items() if k != key})

    # -- encoding (tessera.v1.WorkflowBudget) -------------------------------------------
    def to_proto(self, workflow_id: str) -> budget_pb2.WorkflowBudget:
        return budget_pb2.WorkflowBudget(
            workflow_id=workflow_id,
            limits=common_pb2.Budget(
                max_tool_calls=self.limits.tool_calls,
                max_tokens=self.limits.tokens,
                max_cost_micros=self.limits.cost_micros,
            ),
            committed=self.committed.as_usage(),
            reserved={k: v.as_usage() for k, v in self.reserved.items()},
        )

    @classmethod
    def from_proto(cls, entry: budget_pb2.WorkflowBudget) -> BudgetState:
        return cls(
            limits=Amounts.of(entry.limits),
            committed=Amounts.of(entry.committed),
            reserved={k: Amounts.of(v) for k, v in entry.reserved.items()},
        )

    @classmethod
    def decode(cls, raw: bytes) -> BudgetState:
        return cls.from_proto(budget_pb2.WorkflowBudget.FromString(raw))


def fair_share(free: Amounts, ways: Amounts, cap: Amounts) -> Amounts:
    """What one of the attempts dispatched together asks for, per dimension: an equal
    share of ``free`` among ``ways`` of them (at least one), at most ``cap`` where ``cap``
    sets one (0: no cap)."""
    out = []
    for d in _DIMENSIONS:
        share = max(1, getattr(free, d) // max(1, getattr(ways, d)))
        limit = getattr(cap, d)
        out.append(min(share, limit) if limit > 0 else share)
    return Amounts(*out)


class BudgetMirror:
    """The ledger entries the tool proxy reads, in JetStream KV: a copy of what a
    workflow's state says (:func:`ledger_state`), put by the one replica advancing it.
    KV failures raise UNAVAILABLE (BUDGET_UNAVAILABLE): nothing is dispatched with a
    token whose budget the proxy could not read."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def read(self, workflow_id: str) -> BudgetState | None:
        try:
            entry = await self.kv.get(ledger_key(workflow_id))
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise _unavailable(exc) from None
        return BudgetState.decode(entry.value or b"")

    async def put(self, workflow_id: str, state: BudgetState) -> None:
        try:
            await self.kv.put(ledger_key(workflow_id), _encode(state, workflow_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _unavailable(exc) from None

    async def drop(self, workflow_id: str) -> None:
        """Forget a finished workflow's entry (best effort: its tokens are revoked)."""
        try:
            await self.kv.delete(ledger_key(workflow_id))
        except Exception as exc:
            log.warning("budget_drop_failed", workflow_id=workflow_id, error=repr(exc))


def _encode(state: BudgetState, workflow_id: str) -> bytes:
    return state.to_proto(workflow_id).SerializeToString(deterministic=True)


def _unavailable(exc: BaseException) -> Unavailable:
    log.warning("budget_ledger_unavailable", error=repr(exc))
    return Unavailable(
        "cannot reach the workflow's budget ledger", reason="BUDGET_UNAVAILABLE", retry_after_s=0.5
    )


def ledger_state(rec: WorkflowRecord) -> BudgetState:
    """The workflow's ledger as its state holds it: the plan's limits, what finished
    attempts consumed, and the slice each running attempt reserved (TaskDispatched
    records it before the attempt is sent). The one replica advancing the workflow
    computes it from the state it holds, so it needs no write of its own, and can never
    disagree with the workflow or be left holding a crashed replica's slices."""
    reserved = {
        reservation_key(task.id, task.attempts): Amounts.of(task.reserved.model_dump())
        for task in rec.tasks.values()
        if task.state == TS.TASK_STATE_RUNNING and task.reserved is not None
    }
    return BudgetState(
        limits=Amounts.of(rec.graph().budget),
        committed=Amounts(rec.usage.tool_calls, rec.usage.tokens, rec.usage.cost_micros),
        reserved=reserved,
    )


class TaskBudgets:
    """The runner's side of the ledger: what each dispatched attempt reserves. The
    ledger is the workflow's own state (:func:`ledger_state`); attempts that get a task
    token are mirrored to the KV entry the tool proxy reads (``budget_remaining``).
    Compensations are not reserved (a workflow that failed for its budget must still
    undo its effects); a coordinator built without budgets reserves nothing."""

    def __init__(
        self, mirror: BudgetMirror | None, *, max_task_tool_calls: int, enabled: bool = True
    ) -> None:
        self.mirror = mirror
        self.enabled = enabled
        self.max_task_tool_calls = max_task_tool_calls

    def shares(
        self,
        rec: WorkflowRecord,
        needs_tools: Mapping[str, bool],
        *,
        resent: Collection[str] = (),
    ) -> dict[str, tuple[Amounts, Amounts]]:
        """(want, minimum) per task id of the attempts about to be dispatched together:
        equal shares of what the workflow has free, tool calls only among those that use
        tools (at most ``max_task_tool_calls`` each). The tasks in ``resent`` re-send an
        attempt a crashed replica dispatched: no minimum, as its work was reserved (and
        maybe done and committed) before, and refusing it for budget would strand the
        workflow behind the reservations that attempt's own answer went on to make
        (seen: a handoff's slice, reserved before the crash, held the whole budget)."""
        if not self.enabled or rec.compensating or not needs_tools:
            return {}
        free = ledger_state(rec).available()
        with_tools = sum(1 for t in needs_tools.values() if t)
        ways = Amounts(tool_calls=with_tools, tokens=len(needs_tools), cost_micros=len(needs_tools))
        share = fair_share(free, ways, Amounts(tool_calls=self.max_task_tool_calls))
        out: dict[str, tuple[Amounts, Amounts]] = {}
        for task_id, tools in needs_tools.items():
            calls = 1 if tools else 0
            out[task_id] = (
                replace(share, tool_calls=share.tool_calls if tools else 0),
                Amounts()
                if task_id in resent
                else Amounts(tool_calls=calls, tokens=1, cost_micros=1),
            )
        return out

    async def reserve(
        self,
        rec: WorkflowRecord,
        task_id: str,
        attempt: int,
        share: tuple[Amounts, Amounts],
        *,
        mirrored: bool = False,
    ) -> Amounts:
        """The slice attempt ``attempt`` of ``task_id`` gets (the one it holds already,
        for a re-sent attempt); raises :class:`BudgetExhausted`. The caller records it
        in the attempt's TaskDispatched. ``mirrored``: the attempt gets a token, so the
        tool proxy's entry is written first (UNAVAILABLE when it cannot be)."""
        want, minimum = share
        key = reservation_key(task_id, attempt)
        state = ledger_state(rec).reserve(key, want, minimum=minimum)
        if mirrored and self.mirror is not None:
            await self.mirror.put(rec.id, state)
        return state.reserved[key]

    async def settle(self, rec: WorkflowRecord) -> None:
        """After attempts ended: bring the tool proxy's entry up to date, if the
        workflow has one. Best effort: a stale entry only shows less budget left."""
        if self.mirror is None or not _has_entry(rec):
            return
        try:
            await self.mirror.put(rec.id, ledger_state(rec))
        except Unavailable as exc:
            log.warning("budget_settle_failed", workflow_id=rec.id, error=str(exc))

    async def drop(self, rec: WorkflowRecord) -> None:
        if self.mirror is not None and _has_entry(rec):
            await self.mirror.drop(rec.id)


def _has_entry(rec: WorkflowRecord) -> bool:
    """Whether the tool proxy's entry was written: an attempt of it got a token (every
    replica that advances the workflow can tell, not only the one that wrote it)."""
    return any(task.token_accessor for task in rec.tasks.values())
