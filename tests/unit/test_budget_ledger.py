"""The workflow budget ledger: reserve before, commit after, release on failure; parallel
tasks share one budget, so a fan-out can never reserve more than it (issue 12, part 5).

The ledger's compare-and-set loop runs here against an in-memory stand-in with the same
create/update/get contract as a JetStream KV bucket (revisions, wrong-last-sequence
errors); tests/integration/test_budgets.py runs the same fan-out against a real server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest
from google.protobuf import duration_pb2
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from services.coordinator.budget import (
    Amounts,
    BudgetExhausted,
    BudgetLedger,
    BudgetState,
    TaskBudgets,
    fair_share,
    stale_attempts,
)
from services.coordinator.engine import Dispatch, Emitter, task_answered
from services.coordinator.state import TS, WS, WorkflowRecord, dict_to_struct
from services.coordinator.tokens import max_budget_cents
from services.tool_proxy.budgets import LiveBudgets
from tessera.budgets import cost_remaining_cents, ledger_key
from tessera.v1 import agent_pb2, budget_pb2, common_pb2, events_pb2, planner_pb2


@dataclass
class _Entry:
    value: bytes
    revision: int


class MemoryKV:
    """create/update(last=)/get/delete with JetStream KV's revision semantics; every call
    yields to the loop first, so concurrent callers interleave between read and write."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.seq = 0
        self.writes = 0

    async def get(self, key: str) -> _Entry:
        await asyncio.sleep(0)
        if key not in self.entries:
            raise KeyNotFoundError
        entry = self.entries[key]
        return _Entry(entry.value, entry.revision)

    async def create(self, key: str, value: bytes) -> int:
        await asyncio.sleep(0)
        if key in self.entries:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        await asyncio.sleep(0)
        if key not in self.entries or self.entries[key].revision != last:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def delete(self, key: str) -> None:
        self.entries.pop(key, None)

    def _put(self, key: str, value: bytes) -> int:
        self.seq += 1
        self.writes += 1
        self.entries[key] = _Entry(value, self.seq)
        return self.seq


LIMITS = Amounts(tool_calls=4, tokens=1000, cost_micros=2_000_000)


# -- the arithmetic ---------------------------------------------------------------------


def test_reservations_come_out_of_one_pool_and_are_capped_by_what_is_left() -> None:
    state = BudgetState(limits=LIMITS)
    state = state.reserve("a#1", Amounts(3, 600, 1_500_000), minimum=Amounts(1, 1, 1))
    state = state.reserve("b#1", Amounts(3, 600, 1_500_000), minimum=Amounts(1, 1, 1))
    assert state.reserved["a#1"] == Amounts(3, 600, 1_500_000)
    assert state.reserved["b#1"] == Amounts(1, 400, 500_000)  # only the rest
    assert state.available() == Amounts(0, 0, 0)
    with pytest.raises(BudgetExhausted) as raised:
        state.reserve("c#1", Amounts(1, 1, 1), minimum=Amounts(1, 0, 0))
    assert raised.value.held  # running attempts hold it: worth waiting for


def test_commit_keeps_what_was_used_and_frees_the_rest_release_frees_all() -> None:
    state = BudgetState(limits=LIMITS).reserve("a#1", Amounts(4, 1000, 2_000_000))
    state = state.commit("a#1", Amounts(1, 40, 0))
    assert state.committed == Amounts(1, 40, 0)
    assert state.available() == Amounts(3, 960, 2_000_000)
    state = state.reserve("b#1", Amounts(3, 10, 10)).release("b#1")
    assert state.available() == Amounts(3, 960, 2_000_000)
    # Settling twice (a redelivered step) changes nothing.
    assert state.commit("a#1", Amounts(1, 40, 0)) is state
    assert state.release("b#1") is state


def test_a_re_dispatched_attempt_gets_its_own_slice_back() -> None:
    state = BudgetState(limits=LIMITS).reserve("a#1", Amounts(2, 10, 10))
    assert state.reserve("a#1", Amounts(4, 1000, 10**6)) is state


def test_a_crashed_attempts_reservation_does_not_hold_the_budget_forever() -> None:
    """A coordinator killed between an attempt's answer and its settlement leaves the
    slice reserved; the next attempt's reservation drops what no running attempt holds
    (found stranding a support workflow in the coordinator kill -9 chaos test)."""
    stale = BudgetState(limits=LIMITS).reserve("triage#1", Amounts(4, 10**6, 10**6))
    with pytest.raises(BudgetExhausted) as raised:
        stale.reserve("triage#2", Amounts(1, 1, 1), minimum=Amounts(1, 0, 0))
    assert raised.value.held  # without pruning: a wait for budget nobody will give back
    rec = _record()  # task "a": its attempt 1 answered, the task waits for a retry
    rec.tasks["a"].attempts, rec.tasks["a"].state = 1, TS.TASK_STATE_PENDING
    leftover = BudgetState(limits=LIMITS).reserve("a#1", Amounts(4, 10**6, 10**6))
    fresh = leftover.prune(stale_attempts(rec)).reserve(
        "a#2", Amounts(1, 1, 1), minimum=Amounts(1, 0, 0)
    )
    assert set(fresh.reserved) == {"a#2"}
    rec.tasks["a"].attempts, rec.tasks["a"].state = 2, TS.TASK_STATE_RUNNING
    assert fresh.prune(stale_attempts(rec)) is fresh  # the running attempt keeps its slice
    other = fresh.reserve("b#1", Amounts(0, 1, 1))  # a task the snapshot does not know yet
    assert other.prune(stale_attempts(rec)) is other


def test_a_commit_lost_with_its_settlement_is_counted_from_the_snapshot() -> None:
    """An answer's settlement failed (the ledger mid-election): its slice is pruned, and
    what it consumed still counts, from the usage the snapshot recorded."""
    rec = _record()
    rec.tasks["a"].attempts, rec.tasks["a"].state = 1, TS.TASK_STATE_SUCCEEDED
    rec.usage.tool_calls, rec.usage.tokens = 3, 50
    leftover = BudgetState(limits=LIMITS).reserve("a#1", Amounts(4, 10**6, 10**6))
    pruned = leftover.prune(stale_attempts(rec), recorded=Amounts(3, 50, 0))
    assert pruned.reserved == {}
    assert pruned.committed == Amounts(3, 50, 0)
    assert pruned.available().tool_calls == LIMITS.tool_calls - 3
    # What the ledger already committed is never lowered (it may count a re-sent answer).
    ahead = replace(pruned, committed=Amounts(4, 60, 0))
    assert ahead.prune(stale_attempts(rec), recorded=Amounts(3, 50, 0)) is ahead


def test_a_spent_budget_is_exhausted_not_held() -> None:
    state = BudgetState(limits=LIMITS, committed=Amounts(4, 0, 0))
    with pytest.raises(BudgetExhausted) as raised:
        state.reserve("a#1", Amounts(1, 1, 1), minimum=Amounts(1, 0, 0))
    assert not raised.value.held
    assert raised.value.reason == "BUDGET_EXHAUSTED"


def test_uncapped_dimensions_are_neither_reserved_nor_refused() -> None:
    state = BudgetState(limits=Amounts(tool_calls=2)).reserve(
        "a#1", Amounts(1, 500, 500), minimum=Amounts(1, 1, 1)
    )
    assert state.reserved["a#1"] == Amounts(1, 0, 0)


def test_fair_share_splits_what_is_free_among_the_attempts_dispatched_together() -> None:
    free = Amounts(20, 900, 3_000_000)
    share = fair_share(free, Amounts(3, 3, 3), Amounts(tool_calls=50))
    assert share == Amounts(6, 300, 1_000_000)
    assert fair_share(Amounts(1, 0, 0), Amounts(3, 3, 3), Amounts()) == Amounts(1, 1, 1)


def test_the_live_remaining_cost_follows_other_attempts_not_the_token() -> None:
    state = BudgetState(limits=LIMITS).reserve("a#1", Amounts(1, 1, 500_000))
    state = state.reserve("b#1", Amounts(1, 1, 500_000))
    # a's own slice is a's to spend; b's is not.
    assert state.cost_remaining_cents("a#1") == 150
    state = state.commit("b#1", Amounts(1, 1, 1_400_000))  # b spent more than a thought
    assert state.cost_remaining_cents("a#1") == 60
    state = state.reserve("c#1", Amounts(0, 0, 10**9))  # c holds the rest
    assert state.cost_remaining_cents("a#1") == 50
    assert state.cost_remaining_cents("c#1") == 10
    assert BudgetState(limits=Amounts(tool_calls=1)).cost_remaining_cents("a#1") is None
    assert (
        cost_remaining_cents(
            budget_pb2.WorkflowBudget(
                limits=common_pb2.Budget(max_cost_micros=100),
                committed=common_pb2.Usage(cost_micros=500),
            ),
            "x",
        )
        == 0
    )


def test_the_entry_round_trips_through_its_contract() -> None:
    state = BudgetState(limits=LIMITS, committed=Amounts(1, 2, 3)).reserve("t#2", Amounts(1, 1, 1))
    assert BudgetState.from_proto(state.to_proto("wf")) == state


# -- concurrency ------------------------------------------------------------------------


async def test_a_concurrent_fan_out_never_reserves_more_than_the_budget() -> None:
    """10 parallel tasks each want one tool call of a workflow allowed 4: exactly 4 get
    one, the other 6 are refused (BUDGET_EXHAUSTED, held by the 4), whatever the order."""
    kv = MemoryKV()
    ledger = BudgetLedger(kv)  # type: ignore[arg-type]

    async def one(n: int) -> Amounts | BudgetExhausted:
        try:
            return await ledger.reserve(
                "wf",
                f"t{n}#1",
                limits=LIMITS,
                want=Amounts(tool_calls=1),
                minimum=Amounts(tool_calls=1),
            )
        except BudgetExhausted as exc:
            return exc

    results = await asyncio.gather(*(one(n) for n in range(10)))
    granted = [r for r in results if isinstance(r, Amounts)]
    refused = [r for r in results if isinstance(r, BudgetExhausted)]
    assert len(granted) == 4 and all(g.tool_calls == 1 for g in granted)
    assert len(refused) == 6 and all(r.held for r in refused)
    state = await ledger.read("wf")
    assert state is not None and state.held().tool_calls == 4
    assert kv.writes == 4  # one create, three updates: refusals write nothing

    # Settling concurrently as well: nothing lost, nothing counted twice.
    keys = sorted(state.reserved)
    await asyncio.gather(
        *(ledger.commit("wf", k, Amounts(tool_calls=1, tokens=10)) for k in keys[:2]),
        *(ledger.release("wf", k) for k in keys[2:]),
    )
    state = await ledger.read("wf")
    assert state is not None
    assert state.committed == Amounts(tool_calls=2, tokens=20)
    assert state.reserved == {}
    assert state.available().tool_calls == 2


async def test_fan_out_shares_are_computed_once_per_dispatch_round() -> None:
    kv = MemoryKV()
    budgets = TaskBudgets(BudgetLedger(kv), max_task_tool_calls=50)  # type: ignore[arg-type]
    rec = _record(max_tool_calls=20)
    shares = await budgets.shares(rec, {"credit": True, "fraud": False, "churn": True})
    grants = await asyncio.gather(*(budgets.reserve(rec, t, 1, s) for t, s in shares.items()))
    by_task = dict(zip(shares, grants, strict=True))
    assert by_task["credit"].tool_calls == 10 and by_task["churn"].tool_calls == 10
    assert by_task["fraud"].tool_calls == 0  # uses no tool: reserves none
    assert sum(g.tokens for g in grants) <= 1000
    await budgets.settle(rec.id, "credit", 1, common_pb2.Usage(tool_calls=1, tokens=20))
    await budgets.settle(rec.id, "churn", 1, None)
    state = await budgets.ledger.read(rec.id)  # type: ignore[union-attr]
    assert state is not None and state.committed == Amounts(1, 20, 0)
    assert list(state.reserved) == ["fraud#1"]
    await budgets.drop(rec.id)
    assert ledger_key(rec.id) not in kv.entries


async def test_an_attempt_re_sent_after_a_crash_is_never_refused_for_budget() -> None:
    """The killed replica had committed attempt a#1's answer and reserved the rest for
    the handoff it routed (task a.1), then died before saving either. The new replica
    re-sends a#1 (its answer comes from the agent's dedup) even though a.1#1 holds the
    budget; the handoff, decided again, gets its slice back (found stranding a support
    workflow in the coordinator kill -9 chaos test)."""
    kv = MemoryKV()
    budgets = TaskBudgets(BudgetLedger(kv), max_task_tool_calls=50)  # type: ignore[arg-type]
    rec = _record(max_tool_calls=20)
    (share,) = (await budgets.shares(rec, {"a": True})).values()
    await budgets.reserve(rec, "a", 1, share)
    await budgets.settle(rec.id, "a", 1, common_pb2.Usage(tool_calls=1, tokens=9))
    handoff = await budgets.ledger.reserve(  # type: ignore[union-attr]
        rec.id, "a.1#1", limits=LIMITS, want=Amounts(19, 991, 10**6)
    )
    assert handoff.tool_calls == 19
    with pytest.raises(BudgetExhausted):  # a fresh attempt would wait for ever
        await budgets.reserve(rec, "a", 1, (await budgets.shares(rec, {"a": True}))["a"])
    resent = (await budgets.shares(rec, {"a": True}, resent={"a"}))["a"]
    granted = await budgets.reserve(rec, "a", 1, resent)
    assert granted.tool_calls == 0
    ledger = budgets.ledger
    assert ledger is not None
    again = await ledger.reserve(rec.id, "a.1#1", limits=LIMITS, want=Amounts(1, 1, 1))
    assert again == handoff  # the handoff decided again gets its slice back


# -- what reads and checks it ----------------------------------------------------------------


def _record(*, max_tool_calls: int = 10, max_budget: float | None = 100.0) -> WorkflowRecord:
    plan = planner_pb2.TaskGraph(
        template="t",
        tasks=[
            planner_pb2.TaskSpec(id="a", capability="x.a", timeout=duration_pb2.Duration(seconds=5))
        ],
        budget=common_pb2.Budget(
            max_tokens=1000, max_cost_micros=10**6, max_tool_calls=max_tool_calls
        ),
        blackboard=dict_to_struct({} if max_budget is None else {"max_budget": max_budget}),
    )
    rec = WorkflowRecord(id="wf1")
    Emitter(rec, now=1.0).emit(
        workflow_started=events_pb2.WorkflowStarted(request_id="r", goal="g", plan=plan)
    )
    return rec


def _dispatched(rec: WorkflowRecord, reserved: common_pb2.Usage) -> Dispatch:
    Emitter(rec, now=2.0).emit(
        task_dispatched=events_pb2.TaskDispatched(
            task_id="a", capability="x.a", attempt=1, reserved=reserved
        )
    )
    return Dispatch("a", "x.a", "", 1, 5.0)


def test_an_agent_reporting_more_than_it_reserved_stops_the_workflow() -> None:
    rec = _record()
    dispatch = _dispatched(rec, common_pb2.Usage(tokens=10, cost_micros=100, tool_calls=1))
    assert rec.tasks["a"].reserved is not None and rec.tasks["a"].reserved.tokens == 10
    em = Emitter(rec, now=3.0)
    answer = agent_pb2.ExecuteTaskResponse(usage=common_pb2.Usage(tokens=11))
    task_answered(
        em, dispatch, answer, common_pb2.CapabilityContract(name="x.a"), agent_instance="i"
    )
    assert rec.state == WS.WORKFLOW_STATE_FAILED
    trips = [e.guardrail_tripped for e in em.events if e.HasField("guardrail_tripped")]
    assert trips and trips[0].guardrail == events_pb2.GUARDRAIL_BUDGET
    assert "above the 10 reserved" in trips[0].detail


def test_an_agent_within_its_reservation_goes_on() -> None:
    rec = _record()
    dispatch = _dispatched(rec, common_pb2.Usage(tokens=10, cost_micros=100, tool_calls=1))
    em = Emitter(rec, now=3.0)
    answer = agent_pb2.ExecuteTaskResponse(usage=common_pb2.Usage(tokens=10, tool_calls=1))
    task_answered(
        em, dispatch, answer, common_pb2.CapabilityContract(name="x.a"), agent_instance="i"
    )
    assert not any(e.HasField("guardrail_tripped") for e in em.events)
    assert rec.tasks["a"].state == TS.TASK_STATE_SUCCEEDED
    assert rec.state != WS.WORKFLOW_STATE_FAILED


def test_max_budget_reaches_the_token_in_cents_rounded_down() -> None:
    assert max_budget_cents(_record(max_budget=10000).graph()) == 1_000_000
    assert max_budget_cents(_record(max_budget=99.999).graph()) == 9999
    assert max_budget_cents(_record(max_budget=None).graph()) is None
    graph = _record().graph()
    graph.blackboard.update({"max_budget": "lots"})
    assert max_budget_cents(graph) is None
    graph.blackboard.update({"max_budget": -5})
    assert max_budget_cents(graph) is None


@dataclass
class _Info:
    meta: dict[str, str]


@dataclass
class _Token:
    info: _Info
    workflow: str = "wf1"


async def test_the_tool_proxy_reads_the_live_remaining_budget_and_fails_closed() -> None:
    kv = MemoryKV()
    live = LiveBudgets(kv, default_cents=10**12)  # type: ignore[arg-type]
    mine = _Token(_Info({"reservation": "a#1", "budget_remaining": "999999"}))
    # The workflow's entry is gone (it ended): nothing is left.
    assert await live.remaining_cents(mine) == 0  # type: ignore[arg-type]
    state = BudgetState(limits=Amounts(4, 1000, 1_000_000)).reserve("a#1", Amounts(1, 1, 300_000))
    kv.entries[ledger_key("wf1")] = _Entry(state.to_proto("wf1").SerializeToString(), 1)
    assert await live.remaining_cents(mine) == 100  # type: ignore[arg-type]
    # Another task commits: the very next call sees it (the token's meta is ignored).
    state = state.reserve("b#1", Amounts(1, 1, 0)).commit("b#1", Amounts(0, 0, 1_000_000))
    kv.entries[ledger_key("wf1")] = _Entry(state.to_proto("wf1").SerializeToString(), 2)
    assert await live.remaining_cents(mine) == 0  # type: ignore[arg-type]
    # A token issued without the ledger keeps its frozen value, else the default.
    legacy = _Token(_Info({"budget_remaining": "42"}))
    assert await live.remaining_cents(legacy) == 42  # type: ignore[arg-type]
    assert await LiveBudgets(None, default_cents=7).remaining_cents(legacy) == 42  # type: ignore[arg-type]

    class Down(MemoryKV):
        async def get(self, key: str) -> _Entry:
            raise ConnectionError("nats down")

    with pytest.raises(Exception) as raised:
        await LiveBudgets(Down(), default_cents=1).remaining_cents(mine)  # type: ignore[arg-type]
    assert getattr(raised.value, "reason", "") == "BUDGET_UNAVAILABLE"
