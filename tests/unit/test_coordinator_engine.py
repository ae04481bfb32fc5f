"""The coordinator's decisions, without I/O: what a workflow does next, and that the
event history always rebuilds the snapshot."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.coordinator.engine import (
    Emitter,
    approval_required,
    decide_gate,
    effect_outcome_unknown,
    next_steps,
    status,
    task_answered,
    task_failed,
    tool_approval_needed,
)
from services.coordinator.saga import SETTLE_S
from services.coordinator.state import GS, TS, WS, WorkflowRecord, apply_event, dict_to_struct
from tessera.runtime.errors import FailedPrecondition, error_details, to_grpc_status
from tessera.v1 import agent_pb2, common_pb2, events_pb2, planner_pb2, tool_proxy_pb2


def _plan(*tasks: planner_pb2.TaskSpec, constraints=(), max_iterations: int = 20):
    return planner_pb2.TaskGraph(
        template="t",
        tasks=list(tasks),
        budget=common_pb2.Budget(
            max_tokens=1000, max_cost_micros=10**6, max_tool_calls=10, max_iterations=max_iterations
        ),
        blackboard=dict_to_struct({"max_budget": 100}),
        constraints=list(constraints),
    )


def _task(task_id: str, capability: str, *deps: str, **kw) -> planner_pb2.TaskSpec:
    return planner_pb2.TaskSpec(
        id=task_id,
        capability=capability,
        depends_on=list(deps),
        timeout=duration_pb2.Duration(seconds=5),
        **kw,
    )


def _contract(name: str, **kw) -> common_pb2.CapabilityContract:
    return common_pb2.CapabilityContract(name=name, version="1.0.0", **kw)


def _answer(output=None, writes=None, handoff=None, **kw) -> agent_pb2.ExecuteTaskResponse:
    response = agent_pb2.ExecuteTaskResponse(
        output=common_pb2.Payload(json=dict_to_struct(output or {})), **kw
    )
    for key, value in (writes or {}).items():
        response.blackboard_writes[key].CopyFrom(dict_to_struct({"v": value}).fields["v"])
    if handoff:
        response.handoff.CopyFrom(agent_pb2.Handoff(capability=handoff))
    return response


def _start(plan: planner_pb2.TaskGraph) -> WorkflowRecord:
    rec = WorkflowRecord(id="wf1")
    Emitter(rec, now=1.0).emit(
        workflow_started=events_pb2.WorkflowStarted(request_id="r", goal="g", plan=plan)
    )
    return rec


def _run(
    rec: WorkflowRecord,
    answers: dict[str, agent_pb2.ExecuteTaskResponse],
    contracts: dict[str, common_pb2.CapabilityContract],
    now: float = 2.0,
) -> list[str]:
    """Drive the workflow with canned agent answers; returns the dispatch order."""
    order: list[str] = []
    for _ in range(50):
        em = Emitter(rec, now=now)
        dispatches = next_steps(em, in_flight=set())
        if not dispatches:
            return order
        for d in dispatches:
            em.emit(
                task_dispatched=events_pb2.TaskDispatched(
                    task_id=d.task_id, capability=d.capability, attempt=d.attempt
                )
            )
            order.append(d.capability)
            task_answered(
                em, d, answers[d.capability], contracts[d.capability], agent_instance="a1"
            )
        now += 10
    raise AssertionError("workflow did not settle")


def _replay(rec: WorkflowRecord) -> WorkflowRecord:
    rebuilt = WorkflowRecord(id=rec.id)
    for event in rec.outbox:
        # Through the wire format, as the history stores it.
        apply_event(rebuilt, events_pb2.WorkflowEvent.FromString(event.SerializeToString()))
    return rebuilt


def test_sequential_pipeline_completes_with_the_last_output() -> None:
    rec = _start(_plan(_task("a", "x.a"), _task("b", "x.b", "a")))
    contracts = {"x.a": _contract("x.a", writes=["k"]), "x.b": _contract("x.b")}
    order = _run(rec, {"x.a": _answer(writes={"k": 1}), "x.b": _answer({"done": True})}, contracts)
    assert order == ["x.a", "x.b"]
    assert rec.state == WS.WORKFLOW_STATE_SUCCEEDED
    assert rec.result == {"done": True}
    assert rec.blackboard["k"] == 1


def test_repeated_handoff_without_blackboard_change_escalates_to_a_gate() -> None:
    rec = _start(_plan(_task("t", "s.billing")))
    contracts = {
        "s.billing": _contract("s.billing", handoffs=["s.account"]),
        "s.account": _contract("s.account", handoffs=["s.billing"]),
    }
    answers = {"s.billing": _answer(handoff="s.account"), "s.account": _answer(handoff="s.billing")}
    _run(rec, answers, contracts)
    assert rec.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    (gate,) = rec.pending_gates()
    assert gate.kind == events_pb2.GATE_KIND_LOOP_ESCALATION
    em = Emitter(rec, now=100.0)
    decide_gate(em, gate.id, approve=False, decided_by="alice", comment="stop")
    assert rec.state == WS.WORKFLOW_STATE_CANCELLED
    assert rec.gates[gate.id].state == GS.GATE_STATE_REJECTED


def test_write_breaking_a_constraint_is_rolled_back_and_retried() -> None:
    rule = planner_pb2.BlackboardConstraint(
        key="offer.price", operator=planner_pb2.CONSTRAINT_OPERATOR_LTE, limit_key="max_budget"
    )
    rec = _start(_plan(_task("n", "p.neg"), constraints=[rule]))
    contracts = {"p.neg": _contract("p.neg", writes=["offer"])}
    em = Emitter(rec, now=2.0)
    (d,) = next_steps(em, in_flight=set())
    em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="n", attempt=1))
    task_answered(
        em, d, _answer(writes={"offer": {"price": 120}}), contracts["p.neg"], agent_instance="a"
    )
    assert "offer" not in rec.blackboard
    assert rec.tasks["n"].state == TS.TASK_STATE_PENDING  # will retry
    kinds = [e.WhichOneof("kind") for e in em.events]
    assert "blackboard_rolled_back" in kinds


def test_output_breaking_the_contract_fails_the_attempt() -> None:
    rec = _start(_plan(_task("a", "x.a", max_attempts=1)))
    contract = _contract("x.a", writes=["allowed"])
    _run(rec, {"x.a": _answer(writes={"forbidden": 1})}, {"x.a": contract})
    assert rec.state == WS.WORKFLOW_STATE_FAILED
    assert rec.tasks["a"].error is not None
    assert "not declared" in rec.tasks["a"].error.message


def test_low_confidence_holds_the_result_for_review() -> None:
    rec = _start(_plan(_task("a", "x.a")))
    contract = _contract("x.a", confidence_threshold=0.8, writes=["k"])
    _run(
        rec,
        {"x.a": _answer({"r": 1}, writes={"k": 2}, confidence=0.4, has_confidence=True)},
        {"x.a": contract},
    )
    (gate,) = rec.pending_gates()
    assert "k" not in rec.blackboard  # held, not applied
    em = Emitter(rec, now=50.0)
    decide_gate(em, gate.id, approve=True, decided_by="bob", comment="")
    assert rec.blackboard["k"] == 2
    assert next_steps(em, in_flight=set()) == []
    assert rec.state == WS.WORKFLOW_STATE_SUCCEEDED


def test_iteration_cap_stops_the_workflow() -> None:
    rec = _start(_plan(_task("t", "s.a"), max_iterations=3))
    contracts = {
        "s.a": _contract("s.a", handoffs=["s.b"], writes=["n"]),
        "s.b": _contract("s.b", handoffs=["s.a"], writes=["n"]),
    }
    counter = iter(range(1000))

    class Answers(dict):
        def __getitem__(self, cap):
            return _answer(writes={"n": next(counter)}, handoff="s.b" if cap == "s.a" else "s.a")

    _run(rec, Answers(), contracts)
    assert rec.state == WS.WORKFLOW_STATE_FAILED
    assert rec.error is not None and rec.error.reason == "ITERATION_CAP"


def test_fan_out_with_a_failed_optional_branch_completes_partially() -> None:
    rec = _start(
        _plan(
            _task("a", "r.a"),
            _task("b", "r.b", optional=True, max_attempts=1),
            _task("agg", "r.agg", "a", "b"),
        )
    )
    em = Emitter(rec, now=2.0)
    dispatches = next_steps(em, in_flight=set())
    assert {d.task_id for d in dispatches} == {"a", "b"}
    for d in dispatches:
        em.emit(task_dispatched=events_pb2.TaskDispatched(task_id=d.task_id, attempt=1))
    task_answered(em, dispatches[0], _answer(writes={}), _contract("r.a"), agent_instance="x")
    task_failed(em, "b", 1, status(grpc.StatusCode.DEADLINE_EXCEEDED, "slow", "TIMEOUT"))
    (agg,) = next_steps(em, in_flight=set())
    assert agg.task_id == "agg"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["write", "handoff", "plain", "low"]), min_size=1, max_size=8))
def test_replaying_the_history_rebuilds_the_snapshot(script: list[str]) -> None:
    rec = _start(_plan(_task("t", "c.a"), max_iterations=100))
    contract = _contract("c.a", writes=["k"], handoffs=["c.a"], confidence_threshold=0.5)
    steps = iter(script)

    class Answers(dict):
        def __getitem__(self, cap):
            step = next(steps, "plain")
            if step == "write":
                return _answer(writes={"k": len(script)}, handoff="c.a")
            if step == "handoff":
                return _answer(handoff="c.a")
            if step == "low":
                return _answer(confidence=0.1, has_confidence=True)
            return _answer({"ok": True})

    _run(rec, Answers(), {"c.a": contract})
    rebuilt = _replay(rec)
    assert rebuilt.model_dump() == rec.model_dump()


def test_a_retry_waits_at_least_as_long_as_the_failure_asked() -> None:
    """RetryInfo (e.g. an idempotency claim whose crashed executor's lease ends in 7 s)
    pushes the retry past the jittered backoff; without it the backoff alone applies."""
    rec = _start(_plan(_task("a", "cap.a", max_attempts=3)))
    em = Emitter(rec, now=100.0)
    (dispatch,) = next_steps(em, in_flight=set())
    assert dispatch.attempt == 1
    em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="a", capability="cap.a", attempt=1))
    error = status(grpc.StatusCode.ABORTED, "in progress", "IDEMPOTENCY_IN_PROGRESS")
    task_failed(em, "a", 1, error, retry_base_s=0.1, retry_max_s=2.0, retry_after_s=7.0)
    waited = em.events[-1].task_failed
    assert waited.will_retry
    assert waited.retry_time.ToMicroseconds() >= 107_000_000
    assert next_steps(Emitter(rec, now=106.9), in_flight=set()) == []
    assert [x.attempt for x in next_steps(Emitter(rec, now=107.0), in_flight=set())] == [2]

    em = Emitter(rec, now=200.0)
    em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="a", capability="cap.a", attempt=2))
    task_failed(em, "a", 2, error, retry_base_s=0.1, retry_max_s=2.0)
    assert em.events[-1].task_failed.retry_time.ToMicroseconds() <= 202_000_000


def _fail_transient(rec: WorkflowRecord, now: float, attempt: int, *, dispatched: bool) -> float:
    """One attempt lost to the infrastructure; returns when the retry is due."""
    em = Emitter(rec, now=now)
    if dispatched:
        em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="a", attempt=attempt))
    refused = status(grpc.StatusCode.UNAVAILABLE, "connection refused", "UNAVAILABLE")
    task_failed(em, "a", attempt, refused, transient=True, retry_base_s=0.1, retry_max_s=2.0)
    failed = em.events[-1].task_failed
    assert failed.will_retry and failed.transient
    return float(failed.retry_time.ToMicroseconds() / 1e6)


def test_transient_faults_never_spend_the_tasks_attempts() -> None:
    """An agent restarting for longer than three attempts' backoff: the task keeps
    being retried (new attempt numbers, so agents never answer from a stale dedup
    record) and counts as one iteration; the agent's own errors still spend attempts."""
    rec = _start(_plan(_task("a", "cap.a", max_attempts=3), max_iterations=5))
    now = 10.0
    for _ in range(12):
        (dispatch,) = next_steps(Emitter(rec, now=now), in_flight=set())
        now = _fail_transient(rec, now, dispatch.attempt, dispatched=True)
    assert rec.tasks["a"].state == TS.TASK_STATE_PENDING
    assert rec.tasks["a"].attempts == 12
    assert rec.iterations == 1, "resends after transient faults are one execution"
    (dispatch,) = next_steps(Emitter(rec, now=now), in_flight=set())
    assert dispatch.attempt == 13
    for attempt in range(13, 16):  # the agent's own failures: three attempts
        em = Emitter(rec, now=now)
        em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="a", attempt=attempt))
        task_failed(em, "a", attempt, status(grpc.StatusCode.INTERNAL, "bug", "INTERNAL"))
        now += 10
        if attempt < 15:
            assert em.events[-1].task_failed.will_retry
            next_steps(Emitter(rec, now=now), in_flight=set())
    assert rec.tasks["a"].state == TS.TASK_STATE_FAILED
    assert rec.iterations == 3


def test_transient_backoff_grows_and_stays_capped() -> None:
    rec = _start(_plan(_task("a", "cap.a")))
    now, waits = 10.0, []
    for attempt in range(1, 10):
        due = _fail_transient(rec, now, attempt, dispatched=False)  # no live replica
        waits.append(due - now)
        now = due
    assert 0.05 <= waits[0] <= 0.1
    assert all(w <= 2.0 for w in waits) and max(waits) >= 1.0
    assert rec.iterations == 0, "nothing ran while no agent was there"


def test_a_transient_wait_ends_at_the_workflow_deadline() -> None:
    rec = _start(_plan(_task("a", "cap.a")))
    rec.deadline = 12.0
    due = 10.0
    while due < 12.0:
        due = _fail_transient(rec, due, 1, dispatched=False)
    assert due == 12.0, "the last wait wakes up at the deadline, not past it"
    em = Emitter(rec, now=12.0)
    assert next_steps(em, in_flight=set()) == []
    assert rec.state == WS.WORKFLOW_STATE_FAILED
    assert rec.error is not None and rec.error.reason == "WORKFLOW_DEADLINE"
    assert rec.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_a_task_deadline_fails_a_task_that_keeps_meeting_faults() -> None:
    spec = _task("a", "cap.a", deadline=duration_pb2.Duration(seconds=5))
    rec = _start(_plan(spec))
    due = _fail_transient(rec, 10.0, 1, dispatched=True)
    while due < 15.0:
        next_steps(Emitter(rec, now=due), in_flight=set())
        due = _fail_transient(rec, due, rec.tasks["a"].attempts + 1, dispatched=True)
    next_steps(Emitter(rec, now=15.0), in_flight=set())
    assert rec.tasks["a"].state == TS.TASK_STATE_FAILED
    assert rec.tasks["a"].error is not None and rec.tasks["a"].error.reason == "TASK_DEADLINE"
    assert rec.state == WS.WORKFLOW_STATE_FAILED


def test_time_parked_on_a_gate_extends_the_deadline() -> None:
    gate = planner_pb2.TaskSpec(id="g", kind=planner_pb2.TASK_KIND_APPROVAL_GATE)
    rec = _start(_plan(gate, _task("a", "cap.a", "g")))
    rec.deadline = 100.0
    next_steps(Emitter(rec, now=10.0), in_flight=set())
    assert rec.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    decide_gate(Emitter(rec, now=500.0), "g-approval", approve=True, decided_by="x", comment="")
    assert rec.deadline == 590.0
    (dispatch,) = next_steps(Emitter(rec, now=501.0), in_flight=set())
    assert dispatch.task_id == "a"


def _dispatch_answer(
    rec: WorkflowRecord,
    now: float,
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode],
    contracts: dict[str, common_pb2.CapabilityContract],
) -> list[str]:
    """One round: dispatch what is ready (recording its contract like the runner) and
    answer it; returns the task ids dispatched."""
    em = Emitter(rec, now=now)
    ran = []
    for d in next_steps(em, in_flight=set()):
        contract = contracts[d.capability]
        em.emit(
            task_dispatched=events_pb2.TaskDispatched(
                task_id=d.task_id,
                capability=d.capability,
                attempt=d.attempt,
                side_effect_class=contract.side_effect_class,
                compensation=contract.compensation,
            )
        )
        answer = answers[d.capability]
        if isinstance(answer, grpc.StatusCode):
            task_failed(em, d.task_id, d.attempt, status(answer, "broken", answer.name))
        else:
            task_answered(em, d, answer, contract, agent_instance="a1")
        ran.append(d.task_id)
    return ran


EXTERNAL = common_pb2.SIDE_EFFECT_CLASS_EXTERNAL_ACTION
SAGA_CONTRACTS = {
    "pay": _contract("pay", side_effect_class=EXTERNAL, compensation="pay.undo"),
    "ship": _contract("ship", side_effect_class=EXTERNAL, compensation="ship.undo"),
    "mail": _contract("mail", side_effect_class=EXTERNAL),
    "look": _contract("look", side_effect_class=common_pb2.SIDE_EFFECT_CLASS_READ_ONLY),
    "boom": _contract("boom", side_effect_class=EXTERNAL, compensation="boom.undo"),
    "pay.undo": _contract("pay.undo", side_effect_class=EXTERNAL),
    "ship.undo": _contract("ship.undo", side_effect_class=EXTERNAL),
    "boom.undo": _contract("boom.undo", side_effect_class=EXTERNAL),
}


def _saga() -> WorkflowRecord:
    return _start(
        _plan(
            _task("look", "look"),
            _task("pay", "pay", "look"),
            _task("mail", "mail", "pay"),
            _task("ship", "ship", "mail"),
            _task("boom", "boom", "ship", max_attempts=1),
        )
    )


def test_a_failing_workflow_undoes_its_effects_latest_first_then_fails() -> None:
    rec = _saga()
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode] = {
        cap: _answer({"ok": cap}) for cap in SAGA_CONTRACTS
    }
    answers["boom"] = grpc.StatusCode.INTERNAL  # the agent's own failure, no retry
    ran: list[str] = []
    for step in range(12):
        ran += _dispatch_answer(rec, 10.0 + step, answers, SAGA_CONTRACTS)
        if rec.terminal:
            break
    # boom was attempted (it may have done something) and ended last: undone first.
    assert ran == ["look", "pay", "mail", "ship", "boom", "boom.undo", "ship.undo", "pay.undo"]
    assert rec.state == WS.WORKFLOW_STATE_FAILED, "mail's e-mail cannot be undone"
    assert rec.compensated == ["boom", "ship", "pay"]
    assert rec.uncompensated == ["mail"]
    assert rec.error is not None and rec.error.reason == "TASK_FAILED"
    undo = rec.tasks["pay.undo"]
    assert undo.input["task_id"] == "pay" and undo.input["succeeded"] is True
    assert undo.input["output"] == {"ok": "pay"}
    assert _replay(rec).model_dump() == rec.model_dump()


def test_a_workflow_whose_effects_were_all_undone_ends_compensated() -> None:
    rec = _saga()
    contracts = {
        **SAGA_CONTRACTS,
        "mail": _contract("mail", side_effect_class=EXTERNAL, compensation="pay.undo"),
    }
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode] = {
        cap: _answer({"ok": cap}) for cap in contracts
    }
    answers["boom"] = grpc.StatusCode.INTERNAL
    for step in range(12):
        _dispatch_answer(rec, 10.0 + step, answers, contracts)
    assert rec.state == WS.WORKFLOW_STATE_COMPENSATED
    assert rec.uncompensated == [] and set(rec.compensated) == {"boom", "ship", "mail", "pay"}


def test_a_failed_compensation_is_reported_and_the_rest_still_run() -> None:
    rec = _saga()
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode] = {
        cap: _answer({"ok": cap}) for cap in SAGA_CONTRACTS
    }
    answers["boom"] = grpc.StatusCode.INTERNAL
    answers["ship.undo"] = grpc.StatusCode.FAILED_PRECONDITION
    ran: list[str] = []
    for step in range(20):
        ran += _dispatch_answer(rec, 10.0 + 10 * step, answers, SAGA_CONTRACTS)
    assert "pay.undo" in ran, "pay is undone although ship's undo failed"
    assert rec.state == WS.WORKFLOW_STATE_FAILED
    assert rec.compensated == ["boom", "pay"]
    assert set(rec.uncompensated) == {"mail", "ship"}


def _start_expiring(plan: planner_pb2.TaskGraph, expiry_s: float) -> WorkflowRecord:
    rec = WorkflowRecord(id="wf1")
    started = events_pb2.WorkflowStarted(request_id="r", goal="g", plan=plan)
    started.gate_expiry.FromSeconds(int(expiry_s))
    Emitter(rec, now=1.0).emit(workflow_started=started)
    return rec


def test_a_gate_nobody_decides_in_time_resolves_as_rejected() -> None:
    gate = planner_pb2.TaskSpec(id="g", kind=planner_pb2.TASK_KIND_APPROVAL_GATE)
    rec = _start_expiring(_plan(gate, _task("a", "cap.a", "g")), expiry_s=3600)
    next_steps(Emitter(rec, now=10.0), in_flight=set())
    (opened,) = rec.pending_gates()
    assert opened.expire_time == 3610.0 and rec.next_gate_expiry() == 3610.0
    assert next_steps(Emitter(rec, now=3609.0), in_flight=set()) == []
    assert opened.state == GS.GATE_STATE_PENDING  # not yet
    assert next_steps(Emitter(rec, now=3610.0), in_flight=set()) == []
    assert rec.gates["g-approval"].state == GS.GATE_STATE_REJECTED
    assert rec.gates["g-approval"].decided_by == "tessera/gate-expiry"
    assert rec.state == WS.WORKFLOW_STATE_CANCELLED and rec.next_gate_expiry() is None
    assert rec.tasks["a"].state == TS.TASK_STATE_PENDING  # never ran
    replayed = _replay(rec).model_dump()
    assert replayed == rec.model_dump()  # the expiry is in the events


def test_an_expired_gate_cancels_through_the_compensations() -> None:
    gate = planner_pb2.TaskSpec(id="g", kind=planner_pb2.TASK_KIND_APPROVAL_GATE)
    plan = _plan(_task("pay", "pay"), gate, _task("ship", "ship", "pay", "g"))
    rec = _start_expiring(plan, expiry_s=60)
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode] = {
        cap: _answer({"ok": cap}) for cap in SAGA_CONTRACTS
    }
    _dispatch_answer(rec, 10.0, answers, SAGA_CONTRACTS)
    _dispatch_answer(rec, 11.0, answers, SAGA_CONTRACTS)
    assert rec.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    # The tick that expires the gate begins the compensation; the payment's undoing
    # runs once the revoked tokens have settled.
    assert _dispatch_answer(rec, 72.0, answers, SAGA_CONTRACTS) == []
    assert rec.gates["g-approval"].decided_by == "tessera/gate-expiry"
    assert _dispatch_answer(rec, 72.0 + SETTLE_S, answers, SAGA_CONTRACTS) == ["pay.undo"]
    assert _dispatch_answer(rec, 73.0 + SETTLE_S, answers, SAGA_CONTRACTS) == []
    assert rec.state == WS.WORKFLOW_STATE_COMPENSATED


def test_gates_of_a_workflow_started_without_an_expiry_never_expire() -> None:
    gate = planner_pb2.TaskSpec(id="g", kind=planner_pb2.TASK_KIND_APPROVAL_GATE)
    rec = _start(_plan(gate, _task("a", "cap.a", "g")))
    next_steps(Emitter(rec, now=10.0), in_flight=set())
    next_steps(Emitter(rec, now=10.0 + 400 * 24 * 3600), in_flight=set())
    assert rec.pending_gates() and rec.next_gate_expiry() is None


def test_a_rejected_gate_cancels_through_the_compensations() -> None:
    gate = planner_pb2.TaskSpec(id="g", kind=planner_pb2.TASK_KIND_APPROVAL_GATE)
    rec = _start(_plan(_task("pay", "pay"), gate, _task("ship", "ship", "pay", "g")))
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode] = {
        cap: _answer({"ok": cap}) for cap in SAGA_CONTRACTS
    }
    _dispatch_answer(rec, 10.0, answers, SAGA_CONTRACTS)
    _dispatch_answer(rec, 11.0, answers, SAGA_CONTRACTS)
    assert rec.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    decide_gate(Emitter(rec, now=12.0), "g-approval", approve=False, decided_by="ann", comment="")
    assert rec.state == WS.WORKFLOW_STATE_COMPENSATING
    assert rec.tasks["ship"].state == TS.TASK_STATE_SKIPPED
    # Not before SETTLE_S: a call of the revoked tokens may still be admitted until then
    # (a refund landing after its reversal looked would stay unreversed).
    assert _dispatch_answer(rec, 12.0 + SETTLE_S - 0.1, answers, SAGA_CONTRACTS) == []
    assert _dispatch_answer(rec, 12.0 + SETTLE_S, answers, SAGA_CONTRACTS) == ["pay.undo"]
    assert _dispatch_answer(rec, 13.0 + SETTLE_S, answers, SAGA_CONTRACTS) == []
    assert rec.state == WS.WORKFLOW_STATE_COMPENSATED
    assert _replay(rec).model_dump() == rec.model_dump()
    assert rec.error is not None and "rejected" in rec.error.message


def test_a_failure_with_nothing_to_undo_fails_at_once_listing_what_stays() -> None:
    rec = _start(_plan(_task("mail", "mail"), _task("boom", "look", "mail", max_attempts=1)))
    answers: dict[str, agent_pb2.ExecuteTaskResponse | grpc.StatusCode] = {
        "mail": _answer({"sent": True}),
        "look": grpc.StatusCode.INTERNAL,
    }
    for step in range(4):
        _dispatch_answer(rec, 10.0 + step, answers, SAGA_CONTRACTS)
    assert rec.state == WS.WORKFLOW_STATE_FAILED
    assert rec.uncompensated == ["mail"] and rec.compensated == []
    assert not any(t.compensates for t in rec.tasks.values())


def test_an_effect_nobody_can_vouch_for_waits_for_a_human_then_runs_again() -> None:
    """EFFECT_OUTCOME_UNKNOWN: neither retried (it could pay twice) nor failed (it could
    leave a payment undone): a gate opens; approving it runs the task again."""
    rec = _start(_plan(_task("pay", "pay", max_attempts=1)))
    em = Emitter(rec, now=10.0)
    assert [d.attempt for d in next_steps(em, in_flight=set())] == [1]
    em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="pay", attempt=1))
    effect_outcome_unknown(em, "pay", 1, "billing.issue_refund cannot tell")
    assert rec.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    (gate,) = rec.gates.values()
    assert gate.kind == events_pb2.GATE_KIND_EFFECT_UNKNOWN and "cannot tell" in gate.reason
    assert next_steps(Emitter(rec, now=11.0), in_flight=set()) == []
    decide_gate(Emitter(rec, now=12.0), gate.id, approve=True, decided_by="ops", comment="")
    (again,) = next_steps(Emitter(rec, now=13.0), in_flight=set())
    assert (again.task_id, again.attempt) == ("pay", 2)


class _Refused(grpc.RpcError):
    """A failed call as the coordinator sees an agent's answer (code, trailing details)."""

    def __init__(self, exc: FailedPrecondition) -> None:
        self._status = to_grpc_status(exc)

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self._status.trailing_metadata)


def test_a_tool_call_waiting_for_approval_parks_on_its_gate_then_runs_again() -> None:
    """The tool proxy's typed ApprovalRequired detail (passed on by the agent) names the
    gate; approving it runs the task again, whose retried call then executes."""
    required = tool_proxy_pb2.ApprovalRequired(
        gate_id="tool-0123456789abcdef", tool="billing.issue_refund", reason="over 1000"
    )
    refusal = FailedPrecondition(
        "needs approval", reason="APPROVAL_REQUIRED", extra_details=[required]
    )
    found = approval_required(error_details(_Refused(refusal)))
    assert found == required

    rec = _start(_plan(_task("refund", "refund", max_attempts=1)))
    em = Emitter(rec, now=10.0)
    (first,) = next_steps(em, in_flight=set())
    em.emit(task_dispatched=events_pb2.TaskDispatched(task_id="refund", attempt=first.attempt))
    tool_approval_needed(em, "refund", found.gate_id, found.reason)
    assert rec.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    gate = rec.gates["tool-0123456789abcdef"]
    assert gate.kind == events_pb2.GATE_KIND_TOOL_APPROVAL and gate.reason == "over 1000"
    assert next_steps(Emitter(rec, now=11.0), in_flight=set()) == []
    decide_gate(Emitter(rec, now=12.0), gate.id, approve=True, decided_by="ops", comment="")
    (again,) = next_steps(Emitter(rec, now=13.0), in_flight=set())
    assert again.task_id == "refund"


def test_a_reason_string_alone_is_not_an_approval_request() -> None:
    """The contract is the typed detail: the old reason-plus-metadata spelling, or the
    detail on another code, parks nothing (the attempt fails like any other)."""
    stringly = FailedPrecondition(
        "needs approval", reason="APPROVAL_REQUIRED", metadata={"gate": "tool-1"}
    )
    assert approval_required(error_details(_Refused(stringly))) is None
    empty = FailedPrecondition(
        "x", reason="APPROVAL_REQUIRED", extra_details=[tool_proxy_pb2.ApprovalRequired()]
    )
    assert approval_required(error_details(_Refused(empty))) is None
