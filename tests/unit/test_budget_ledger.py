"""The workflow budget ledger: reserve before, commit after, release on failure; parallel
tasks share one budget, so a fan-out can never reserve more than it (issue 12, part 5).
The ledger is the workflow's own state (ledger_state), mirrored for the tool proxy.

The mirror and the proxy's reads run here against an in-memory stand-in with a JetStream
KV bucket's get/put/delete contract; tests/integration/test_budgets.py runs a fan-out
against a real server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from google.protobuf import duration_pb2
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from services.coordinator.budget import (
    Amounts,
    BudgetExhausted,
    BudgetMirror,
    BudgetState,
    TaskBudgets,
    fair_share,
    ledger_state,
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

    async def put(self, key: str, value: bytes) -> int:
        await asyncio.sleep(0)
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


def _fan_out(n: int, *, max_tool_calls: int) -> WorkflowRecord:
    plan = planner_pb2.TaskGraph(
        template="t",
        tasks=[
            planner_pb2.TaskSpec(
                id=f"t{i}", capability="x.a", timeout=duration_pb2.Duration(seconds=5)
            )
            for i in range(n)
        ],
        budget=common_pb2.Budget(
            max_tokens=1000, max_cost_micros=2_000_000, max_tool_calls=max_tool_calls
        ),
    )
    rec = WorkflowRecord(id="wf1")
    Emitter(rec, now=1.0).emit(
        workflow_started=events_pb2.WorkflowStarted(request_id="r", goal="g", plan=plan)
    )
    return rec


def _dispatch(rec: WorkflowRecord, task_id: str, attempt: int, reserved: Amounts) -> None:
    """What the runner records once an attempt's slice is reserved."""
    Emitter(rec, now=2.0).emit(
        task_dispatched=events_pb2.TaskDispatched(
            task_id=task_id, capability="x.a", attempt=attempt, reserved=reserved.as_usage()
        )
    )


async def test_a_fan_out_dispatched_together_never_reserves_more_than_the_budget() -> None:
    """10 parallel tasks each want one tool call of a workflow allowed 4: exactly 4 get
    one, the other 6 are refused (BUDGET_EXHAUSTED, held by the 4)."""
    rec = _fan_out(10, max_tool_calls=4)
    budgets = TaskBudgets(None, max_task_tool_calls=50)
    granted, refused = [], []
    for i in range(10):
        share = (Amounts(tool_calls=1), Amounts(tool_calls=1))
        try:
            slice_ = await budgets.reserve(rec, f"t{i}", 1, share)
        except BudgetExhausted as exc:
            refused.append(exc)
            continue
        _dispatch(rec, f"t{i}", 1, slice_)
        granted.append(slice_)
    assert len(granted) == 4 and all(g.tool_calls == 1 for g in granted)
    assert len(refused) == 6 and all(r.held for r in refused)
    assert ledger_state(rec).held().tool_calls == 4

    # Answers commit what they used and free the rest; failures free their slice.
    for i, used in ((0, 1), (1, 1)):
        Emitter(rec, now=3.0).emit(
            task_succeeded=events_pb2.TaskSucceeded(
                task_id=f"t{i}", usage=common_pb2.Usage(tool_calls=used, tokens=10)
            )
        )
    state = ledger_state(rec)
    assert state.committed == Amounts(tool_calls=2, tokens=20)
    assert set(state.reserved) == {"t2#1", "t3#1"}
    assert state.available().tool_calls == 0


async def test_fan_out_shares_are_computed_once_per_dispatch_round() -> None:
    budgets = TaskBudgets(None, max_task_tool_calls=50)
    rec = _record(max_tool_calls=20)
    shares = budgets.shares(rec, {"credit": True, "fraud": False, "churn": True})
    by_task = {}
    for task_id, share in shares.items():
        by_task[task_id] = await budgets.reserve(rec, task_id, 1, share)
        rec.tasks.setdefault(task_id, rec.tasks["a"].model_copy(update={"id": task_id}))
        _dispatch(rec, task_id, 1, by_task[task_id])
    assert by_task["credit"].tool_calls == 10 and by_task["churn"].tool_calls == 10
    assert by_task["fraud"].tool_calls == 0  # uses no tool: reserves none
    assert sum(g.tokens for g in by_task.values()) <= 1000


async def test_a_re_sent_attempt_keeps_its_slice_and_is_never_refused_for_budget() -> None:
    """A replica took over a workflow whose attempt a#1 was running and holds the whole
    budget: re-sending a#1 gets the slice it holds back; a fresh attempt of another task
    waits for it (held), and once a#1 failed its slice is free again: a crashed replica
    can never leave a slice behind, as slices live in the workflow's own state."""
    rec = _fan_out(2, max_tool_calls=4)
    budgets = TaskBudgets(None, max_task_tool_calls=50)
    whole = await budgets.reserve(rec, "t0", 1, (Amounts(4, 1000, 2_000_000), Amounts()))
    _dispatch(rec, "t0", 1, whole)
    again = budgets.shares(rec, {"t0": True}, resent={"t0"})["t0"]
    assert await budgets.reserve(rec, "t0", 1, again) == whole
    with pytest.raises(BudgetExhausted) as raised:
        await budgets.reserve(rec, "t1", 1, budgets.shares(rec, {"t1": True})["t1"])
    assert raised.value.held
    Emitter(rec, now=3.0).emit(task_failed=events_pb2.TaskFailed(task_id="t0", attempt=1))
    assert ledger_state(rec).reserved == {}
    assert (await budgets.reserve(rec, "t1", 1, (Amounts(1, 1, 1), Amounts()))).tool_calls == 1


async def test_attempts_with_a_token_are_mirrored_for_the_tool_proxy() -> None:
    kv = MemoryKV()
    budgets = TaskBudgets(BudgetMirror(kv), max_task_tool_calls=50)  # type: ignore[arg-type]
    rec = _fan_out(2, max_tool_calls=4)
    quiet = await budgets.reserve(rec, "t1", 1, (Amounts(1, 1, 1), Amounts()))
    assert kv.writes == 0  # no token, nothing for the proxy to read
    _dispatch(rec, "t1", 1, quiet)
    slice_ = await budgets.reserve(rec, "t0", 1, (Amounts(1, 1, 1), Amounts()), mirrored=True)
    entry = BudgetState.decode(kv.entries[ledger_key(rec.id)].value)
    assert entry.reserved == {"t0#1": slice_, "t1#1": quiet}
    Emitter(rec, now=2.0).emit(
        task_dispatched=events_pb2.TaskDispatched(
            task_id="t0",
            capability="x.a",
            attempt=1,
            reserved=slice_.as_usage(),
            token_accessor="acc",
        )
    )
    Emitter(rec, now=3.0).emit(
        task_succeeded=events_pb2.TaskSucceeded(task_id="t0", usage=common_pb2.Usage(tokens=1))
    )
    await budgets.settle(rec)
    entry = BudgetState.decode(kv.entries[ledger_key(rec.id)].value)
    assert entry.reserved == {"t1#1": quiet} and entry.committed == Amounts(tokens=1)
    await budgets.drop(rec)
    assert ledger_key(rec.id) not in kv.entries

    class Down(MemoryKV):
        async def put(self, key: str, value: bytes) -> int:
            raise ConnectionError("nats down")

    down = TaskBudgets(BudgetMirror(Down()), max_task_tool_calls=50)  # type: ignore[arg-type]
    with pytest.raises(Exception) as raised:
        await down.reserve(
            _fan_out(1, max_tool_calls=4), "t0", 1, (Amounts(1, 1, 1), Amounts()), mirrored=True
        )
    assert getattr(raised.value, "reason", "") == "BUDGET_UNAVAILABLE"


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
