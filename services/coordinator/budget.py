"""The workflow budget ledger: tool calls, model tokens and cost, reserved before the work,
committed after it, released when it fails (docs/decisions.md, "Budgets are reserved").

One entry per workflow in the coordinator's KV bucket ``<ns>_budgets`` (the coordinator
is its only writer; the tool proxy reads it to put the live ``budget_remaining`` into
every policy decision). The entry holds the workflow's limits (its plan's budget), what
finished attempts consumed (``committed``) and what each running attempt holds
(``reserved``, by ``<task id>#<attempt>``). The hierarchy is workflow → task → call:

- workflow → task: :meth:`BudgetLedger.reserve` before an attempt is dispatched takes a
  slice out of what the workflow has left; every task of the workflow reserves from the
  same entry, under compare-and-set, so parallel tasks can never hold more than the
  budget between them.
- task → call: the attempt's task token allows exactly its reserved tool calls; the
  tool proxy's use ledger spends one per executed call (services/tool_proxy/tokens.py).
- :meth:`BudgetLedger.commit` records what the attempt reported and frees the rest of
  its slice; :meth:`BudgetLedger.release` frees the whole slice of a failed attempt.

The arithmetic (:class:`BudgetState`) is pure; :class:`BudgetLedger` does the I/O. Every
operation is idempotent on its reservation key: a replica re-dispatching a crashed
replica's attempt gets the same slice back; a second commit or release is a no-op.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.coordinator.state import TS, WorkflowRecord
from tessera.budgets import cost_remaining_cents, ledger_key, reservation_key
from tessera.runtime.errors import ResourceExhausted, Unavailable
from tessera.v1 import budget_pb2, common_pb2

__all__ = [
    "Amounts",
    "BudgetExhausted",
    "BudgetLedger",
    "BudgetState",
    "TaskBudgets",
    "fair_share",
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

    def prune(
        self, is_stale: Callable[[str], bool], *, recorded: Amounts | None = None
    ) -> BudgetState:
        """Drop the reservations of attempts known to be over (``is_stale``: see
        :func:`stale_attempts`), and count as committed at least what the workflow's
        snapshot ``recorded`` as consumed. A settlement that failed (the ledger mid-
        election), a coordinator killed between an answer and its settlement, or a save
        lost to a conflict after a reservation leaves a slice behind; held forever, it
        would make every later attempt wait for budget that nobody will give back (seen
        stranding workflows when a NATS node or the coordinator was killed)."""
        committed = self.committed
        if recorded is not None:
            committed = Amounts(
                *(max(getattr(committed, d), getattr(recorded, d)) for d in _DIMENSIONS)
            )
        stale = [k for k in self.reserved if is_stale(k)]
        if not stale and committed == self.committed:
            return self
        return replace(
            self,
            committed=committed,
            reserved={k: v for k, v in self.reserved.items() if k not in stale},
        )

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


class BudgetLedger:
    """The ledger in JetStream KV. Every change is a compare-and-set on the workflow's
    entry, retried (bounded, with jittered backoff) when another writer got there first.
    KV failures raise UNAVAILABLE (BUDGET_UNAVAILABLE): nothing is dispatched unreserved."""

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

    async def reserve(
        self,
        workflow_id: str,
        key: str,
        *,
        limits: Amounts,
        want: Amounts,
        minimum: Amounts = Amounts(),
        is_stale: Callable[[str], bool] | None = None,
        recorded: Amounts | None = None,
    ) -> Amounts:
        """Reserve a slice for attempt ``key`` (see :meth:`BudgetState.reserve`); the
        slice. ``limits`` create the entry on the workflow's first reservation. With
        ``is_stale``, the entry is first pruned (:meth:`BudgetState.prune`)."""

        def change(state: BudgetState) -> BudgetState:
            pruned = state if is_stale is None else state.prune(is_stale, recorded=recorded)
            return pruned.reserve(key, want, minimum=minimum)

        state = await self._change(workflow_id, change, limits=limits)
        assert state is not None
        return state.reserved[key]

    async def commit(self, workflow_id: str, key: str, used: Amounts) -> None:
        await self._change(workflow_id, lambda s: s.commit(key, used))

    async def release(self, workflow_id: str, key: str) -> None:
        await self._change(workflow_id, lambda s: s.release(key))

    async def drop(self, workflow_id: str) -> None:
        """Forget a finished workflow's entry (best effort: its tokens are revoked)."""
        try:
            await self.kv.delete(ledger_key(workflow_id))
        except Exception as exc:
            log.warning("budget_drop_failed", workflow_id=workflow_id, error=repr(exc))

    async def _change(
        self,
        workflow_id: str,
        change: Any,
        *,
        limits: Amounts | None = None,
    ) -> BudgetState | None:
        name = ledger_key(workflow_id)
        try:
            for attempt in range(_CAS_ATTEMPTS):
                try:
                    entry = await self.kv.get(name)
                except KeyNotFoundError:
                    entry = None
                if entry is None or not entry.value:
                    if limits is None:
                        return None  # nothing reserved: nothing to settle
                    state: BudgetState = change(BudgetState(limits=limits))
                    try:
                        await self.kv.create(name, _encode(state, workflow_id))
                    except KeyWrongLastSequenceError:
                        await _backoff(attempt)
                        continue
                    return state
                current = BudgetState.decode(entry.value)
                state = change(current)
                if state is current:
                    return state
                try:
                    await self.kv.update(name, _encode(state, workflow_id), last=entry.revision)
                except KeyWrongLastSequenceError:
                    await _backoff(attempt)
                    continue
                return state
        except (BudgetExhausted, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise _unavailable(exc) from None
        raise Unavailable(
            "too much contention on the workflow's budget",
            reason="BUDGET_CONTENDED",
            retry_after_s=0.1,
        )


def _encode(state: BudgetState, workflow_id: str) -> bytes:
    return state.to_proto(workflow_id).SerializeToString(deterministic=True)


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, _BACKOFF_S * (2 ** min(attempt, 6))))


def _unavailable(exc: BaseException) -> Unavailable:
    log.warning("budget_ledger_unavailable", error=repr(exc))
    return Unavailable(
        "cannot reach the workflow's budget ledger", reason="BUDGET_UNAVAILABLE", retry_after_s=0.5
    )


def stale_attempts(rec: WorkflowRecord) -> Callable[[str], bool]:
    """Whether a reservation key names an attempt ``rec`` (the step's snapshot, the
    authority: one replica advances a workflow at a time) shows is over: an earlier
    attempt of its task, or its current one when the task is no longer running. Keys of
    tasks it does not know, or of attempts still to come, are kept."""

    def is_stale(key: str) -> bool:
        task_id, _, number = key.rpartition("#")
        task = rec.tasks.get(task_id)
        if task is None or not number.isdigit():
            return False
        attempt = int(number)
        return attempt < task.attempts or (
            attempt == task.attempts and task.state != TS.TASK_STATE_RUNNING
        )

    return is_stale


def _recorded(rec: WorkflowRecord) -> Amounts:
    """What the workflow's snapshot says its finished attempts consumed."""
    return Amounts(rec.usage.tool_calls, rec.usage.tokens, rec.usage.cost_micros)


class TaskBudgets:
    """The runner's side of the ledger: what each dispatched attempt reserves, and
    settling it when the attempt ends. Compensations are not reserved (a workflow that
    failed for its budget must still undo its effects); without a ledger nothing is."""

    def __init__(self, ledger: BudgetLedger | None, *, max_task_tool_calls: int) -> None:
        self.ledger = ledger
        self.max_task_tool_calls = max_task_tool_calls

    async def shares(
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
        if self.ledger is None or rec.compensating or not needs_tools:
            return {}
        limits = Amounts.of(rec.graph().budget)
        state = await self.ledger.read(rec.id) or BudgetState(limits=limits)
        free = state.prune(stale_attempts(rec), recorded=_recorded(rec)).available()
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
        self, rec: WorkflowRecord, task_id: str, attempt: int, share: tuple[Amounts, Amounts]
    ) -> Amounts:
        assert self.ledger is not None
        want, minimum = share
        return await self.ledger.reserve(
            rec.id,
            reservation_key(task_id, attempt),
            limits=Amounts.of(rec.graph().budget),
            want=want,
            minimum=minimum,
            is_stale=stale_attempts(rec),
            recorded=_recorded(rec),
        )

    async def settle(
        self, workflow_id: str, task_id: str, attempt: int, used: common_pb2.Usage | None
    ) -> None:
        """Commit what the attempt reported (``used``), or release its slice (None: it
        failed without a report). Best effort: a slice left reserved only makes the
        workflow's budget smaller until the workflow ends."""
        if self.ledger is None:
            return
        key = reservation_key(task_id, attempt)
        try:
            if used is None:
                await self.ledger.release(workflow_id, key)
            else:
                await self.ledger.commit(workflow_id, key, Amounts.of(used))
        except Unavailable as exc:
            log.warning("budget_settle_failed", workflow_id=workflow_id, key=key, error=str(exc))

    async def drop(self, workflow_id: str) -> None:
        if self.ledger is not None:
            await self.ledger.drop(workflow_id)
