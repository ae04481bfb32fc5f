"""Workflow decisions: given a snapshot and what just happened, which events follow.

Everything here is synchronous and free of I/O; the runner feeds it agent answers and
persists the events it emits. `Emitter` is the only way state changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from services.coordinator.contracts import contract_problems, output_as_dict
from services.coordinator.saga import compensate, finish_compensation, undo_outcome
from services.coordinator.state import (
    GS,
    TS,
    TaskRun,
    WorkflowRecord,
    apply_event,
    dict_to_struct,
)
from tessera.runtime.errors import ErrorDetails
from tessera.v1 import agent_pb2, common_pb2, events_pb2, planner_pb2, tool_proxy_pb2

GK = events_pb2.GateKind
G = events_pb2.Guardrail


def status(code: grpc.StatusCode, message: str, reason: str) -> status_pb2.Status:
    out = status_pb2.Status(code=code.value[0], message=message)
    out.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="tessera"))
    return out


class Emitter:
    """Appends events to a snapshot: numbers them, applies them, queues them to publish."""

    def __init__(self, rec: WorkflowRecord, *, now: float, causation_id: str = "") -> None:
        self.rec = rec
        self.now = now
        self.causation_id = causation_id
        self.events: list[events_pb2.WorkflowEvent] = []

    def emit(self, **kind: Any) -> events_pb2.WorkflowEvent:
        seq = self.rec.seq + 1
        event = events_pb2.WorkflowEvent(
            event_id=f"{self.rec.id}.{seq}",
            workflow_id=self.rec.id,
            sequence=seq,
            causation_id=self.causation_id,
            **kind,
        )
        event.time.FromMicroseconds(int(self.now * 1e6))
        if event.HasField("gate_opened") and self.rec.gate_expiry_s > 0:
            # Every kind of gate expires alike, so it is stamped here, where they all pass.
            expires = self.now + self.rec.gate_expiry_s
            event.gate_opened.expire_time.FromMicroseconds(int(expires * 1e6))
        apply_event(self.rec, event)
        self.rec.outbox.append(event)
        self.events.append(event)
        return event

    # -- terminal transitions ------------------------------------------------------
    def fail(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        """End the workflow as failed: first through its compensations, if effects ran
        that declared one (see :func:`compensate`)."""
        error = status(code, message, reason)
        if compensate(self, events_pb2.CompensationStarted(error=error)):
            return
        compensated, uncompensated = undo_outcome(self.rec)
        self.emit(
            workflow_failed=events_pb2.WorkflowFailed(
                error=error, compensated=compensated, uncompensated=uncompensated
            )
        )

    def cancel(self, reason: str, cancelled_by: str) -> None:
        """End the workflow as cancelled, through its compensations like :meth:`fail`."""
        cancelled = events_pb2.WorkflowCancelled(reason=reason, cancelled_by=cancelled_by)
        if compensate(self, events_pb2.CompensationStarted(cancelled=cancelled)):
            return
        compensated, uncompensated = undo_outcome(self.rec)
        cancelled.compensated.extend(compensated)
        cancelled.uncompensated.extend(uncompensated)
        self.emit(workflow_cancelled=cancelled)

    def trip(self, guardrail: int, task_id: str, detail: str) -> None:
        self.emit(
            guardrail_tripped=events_pb2.GuardrailTripped(
                guardrail=events_pb2.Guardrail.ValueType(guardrail), task_id=task_id, detail=detail
            )
        )


@dataclass(frozen=True)
class Dispatch:
    """Run `attempt` of `task_id` on an agent."""

    task_id: str
    capability: str
    version: str
    attempt: int
    timeout_s: float


def _retry_time(now: float, streak: int, base_s: float, max_s: float) -> timestamp_pb2.Timestamp:
    # Capped exponential backoff with equal jitter (never retrying at once in a tight
    # loop, never in lockstep); the jitter is fixed in the event, so a replay makes the
    # same decision.
    cap = min(max_s, base_s * (2 ** min(streak - 1, 30)))
    delay = cap / 2 + random.uniform(0, cap / 2)
    out = timestamp_pb2.Timestamp()
    out.FromMicroseconds(int((now + delay) * 1e6))
    return out


def _sinks(rec: WorkflowRecord) -> list[str]:
    roots = [t for t in rec.tasks.values() if t.root == t.id]
    depended = {d for t in roots for d in t.depends_on}
    return [t.id for t in roots if t.id not in depended]


def _over_budget(rec: WorkflowRecord) -> str | None:
    budget = rec.graph().budget
    usage = rec.usage
    for name, used, cap in (
        ("tokens", usage.tokens, budget.max_tokens),
        ("cost_micros", usage.cost_micros, budget.max_cost_micros),
        ("tool_calls", usage.tool_calls, budget.max_tool_calls),
    ):
        if cap > 0 and used > cap:
            return f"{name} budget exhausted: used {used} of {cap}"
    return None


def _over_reservation(rec: WorkflowRecord, task_id: str, usage: common_pb2.Usage) -> str | None:
    """The agent reported more tokens or cost than its attempt reserved (in a dimension
    the workflow's budget caps): a misreporting or overspending agent, stopped like an
    exhausted budget. Tool calls are not checked here: the task token's use limit already
    holds them to the reservation at the tool proxy (an agent's own count also includes
    calls that were refused and spent nothing)."""
    reserved = rec.tasks[task_id].reserved
    if reserved is None:
        return None
    budget = rec.graph().budget
    for name, used, held, cap in (
        ("tokens", usage.tokens, reserved.tokens, budget.max_tokens),
        ("cost_micros", usage.cost_micros, reserved.cost_micros, budget.max_cost_micros),
    ):
        if cap > 0 and used > held:
            return f"task {task_id} reported {used} {name}, above the {held} reserved for it"
    return None


def next_steps(em: Emitter, *, in_flight: set[str]) -> list[Dispatch]:
    """Open due gates, finish or fail the workflow, and say which attempts to run next.

    Tasks already RUNNING but not `in_flight` here were dispatched by a replica that
    crashed: they are dispatched again with the SAME attempt number, which agents
    deduplicate, so the side effect happens once. A failure decided here that starts the
    workflow's compensation returns the compensating tasks' first attempts at once.
    """
    compensating = em.rec.compensating
    dispatches = _next_steps(em, in_flight=in_flight)
    if not dispatches and em.rec.compensating and not compensating:
        dispatches = _next_steps(em, in_flight=in_flight)
    return dispatches


def _next_steps(em: Emitter, *, in_flight: set[str]) -> list[Dispatch]:
    rec = em.rec
    if rec.terminal or _past_deadline(em) or _expire_gates(em):
        return []
    dispatches: list[Dispatch] = []
    for task in list(rec.tasks.values()):
        if task.state == TS.TASK_STATE_RUNNING and task.id not in in_flight:
            dispatches.append(_dispatch(task, task.attempts))
        if task.state != TS.TASK_STATE_PENDING or task.id in in_flight:
            continue
        if not all(rec.resolved(dep) for dep in task.depends_on):
            continue
        if task.retry_at is not None and task.retry_at > em.now:
            continue
        if task.kind == planner_pb2.TASK_KIND_APPROVAL_GATE:
            em.emit(
                gate_opened=events_pb2.GateOpened(
                    gate_id=f"{task.id}-approval",
                    task_id=task.id,
                    reason=task.gate_reason or "approval step",
                    kind=GK.GATE_KIND_APPROVAL_STEP,
                )
            )
            continue
        cap = rec.max_iterations()
        if cap and rec.iterations >= cap and not rec.compensating:
            em.trip(
                G.GUARDRAIL_ITERATION_CAP,
                task.id,
                f"iteration cap of {cap} task executions reached",
            )
            em.fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"iteration cap of {cap} reached before task {task.id}",
                "ITERATION_CAP",
            )
            return []
        dispatches.append(_dispatch(task, task.attempts + 1))
    if dispatches or in_flight or rec.pending_gates():
        return dispatches
    _finish(em)
    return []


def _dispatch(task: TaskRun, attempt: int) -> Dispatch:
    return Dispatch(task.id, task.capability, task.version, attempt, task.timeout_s)


def _finish(em: Emitter) -> None:
    rec = em.rec
    if rec.compensating:
        finish_compensation(em)
        return
    for root in (t for t in rec.tasks.values() if t.root == t.id):
        end = rec.chain_end(root.id)
        if end.state == TS.TASK_STATE_FAILED and not root.optional:
            message = end.error.message if end.error else "task failed"
            em.fail(grpc.StatusCode.ABORTED, f"task {end.id} failed: {message}", "TASK_FAILED")
            return
    if any(t.state == TS.TASK_STATE_PENDING for t in rec.tasks.values()):
        return  # waiting for a retry's backoff
    sinks = _sinks(rec)
    outputs = {s: rec.chain_end(s).output or {} for s in sinks}
    result = outputs[sinks[0]] if len(sinks) == 1 else outputs
    partial = any(
        t.state in (TS.TASK_STATE_FAILED, TS.TASK_STATE_SKIPPED) for t in rec.tasks.values()
    )
    em.emit(
        workflow_completed=events_pb2.WorkflowCompleted(
            result=dict_to_struct(result), partial=partial
        )
    )


def task_failed(
    em: Emitter,
    task_id: str,
    attempt: int,
    error: status_pb2.Status,
    *,
    retryable: bool = True,
    transient: bool = False,
    retry_base_s: float = 0.1,
    retry_max_s: float = 2.0,
    retry_after_s: float = 0.0,
) -> None:
    """Record a failed attempt and when the next one is due.

    ``transient``: the infrastructure failed, not the agent (see TaskFailed.transient);
    it is retried without spending an attempt, with a backoff that grows with the
    faults in a row, until the task's deadline (`next_steps` ends it there).
    ``retry_after_s``: the failure said when a retry can succeed (RetryInfo, e.g. when
    the lease of a crashed executor's idempotency claim ends); the retry waits at least
    that long."""
    task = em.rec.tasks[task_id]
    if transient:
        will_retry = retryable
        streak = task.transient_failures + 1
    else:
        will_retry = retryable and task.failures + 1 < task.max_attempts
        streak = attempt
    failed = events_pb2.TaskFailed(
        task_id=task_id, attempt=attempt, error=error, will_retry=will_retry, transient=transient
    )
    if will_retry:
        at = _retry_time(em.now, streak, retry_base_s, retry_max_s)
        not_before = em.now + max(0.0, retry_after_s)
        if at.ToMicroseconds() < not_before * 1e6:
            at.FromMicroseconds(int(not_before * 1e6))
        deadline = task.deadline(em.rec.deadline)
        if deadline and at.ToMicroseconds() > deadline * 1e6:
            at.FromMicroseconds(int(deadline * 1e6))  # wake up in time to end it
        failed.retry_time.CopyFrom(at)
    em.emit(task_failed=failed)


def _past_deadline(em: Emitter) -> bool:
    """End what ran out of time: the workflow past its deadline fails; a waiting task
    past its own deadline fails (which may fail the workflow). True if the workflow
    ended."""
    rec = em.rec
    if rec.deadline and em.now >= rec.deadline:
        em.trip(G.GUARDRAIL_TIMEOUT, "", "workflow deadline passed")
        em.fail(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the workflow did not finish before its deadline",
            "WORKFLOW_DEADLINE",
        )
        return True
    for task in list(rec.tasks.values()):
        if task.state != TS.TASK_STATE_PENDING or not task.since:
            continue
        deadline = task.deadline(0.0)
        if deadline and em.now >= deadline:
            last = f" (last error: {task.error.message})" if task.error else ""
            em.trip(G.GUARDRAIL_TIMEOUT, task.id, "task deadline passed")
            em.emit(
                task_failed=events_pb2.TaskFailed(
                    task_id=task.id,
                    attempt=task.attempts,
                    error=status(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"task {task.id} did not finish before its deadline{last}",
                        "TASK_DEADLINE",
                    ),
                )
            )
    return False


GATE_EXPIRY = "tessera/gate-expiry"
"""Who decided a gate that nobody decided in time (GateDecided.decided_by)."""


def _expire_gates(em: Emitter) -> bool:
    """Reject every pending gate past its expiry (which ends the workflow cancelled, as
    any rejection does). True if the workflow ended or began compensating (`next_steps`
    then dispatches the compensations)."""
    compensating = em.rec.compensating
    for gate in em.rec.pending_gates():
        if gate.expire_time and em.now >= gate.expire_time:
            waited = em.now - gate.create_time
            decide_gate(
                em,
                gate.id,
                approve=False,
                decided_by=GATE_EXPIRY,
                comment=f"nobody decided it within {waited:.0f} s of its opening",
            )
            if em.rec.terminal or em.rec.compensating != compensating:
                return True
    return False


def _constraint_problems(rec: WorkflowRecord, writes: dict[str, Any]) -> list[str]:
    candidate = {**rec.blackboard, **writes}
    problems = []
    for rule in rec.graph().constraints:
        value = _lookup(candidate, rule.key)
        if rule.operator == planner_pb2.CONSTRAINT_OPERATOR_PRESENT:
            if value is None:
                problems.append(rule.description or f"{rule.key} must be present")
            continue
        limit = _lookup(candidate, rule.limit_key)
        if not isinstance(value, (int, float)) or not isinstance(limit, (int, float)):
            continue
        broken = (rule.operator == planner_pb2.CONSTRAINT_OPERATOR_LTE and value > limit) or (
            rule.operator == planner_pb2.CONSTRAINT_OPERATOR_GTE and value < limit
        )
        if broken:
            problems.append(
                f"{rule.description or rule.key}: {rule.key}={value} vs {rule.limit_key}={limit}"
            )
    return problems


def _lookup(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def task_answered(
    em: Emitter,
    dispatch: Dispatch,
    response: agent_pb2.ExecuteTaskResponse,
    contract: common_pb2.CapabilityContract,
    *,
    agent_instance: str,
    retry_base_s: float = 0.1,
    retry_max_s: float = 2.0,
) -> None:
    """Check an agent's answer and record what follows from it."""
    rec = em.rec
    task_id, attempt = dispatch.task_id, dispatch.attempt
    writes = {k: json_format.MessageToDict(v) for k, v in response.blackboard_writes.items()}

    def refuse(guardrail: int, message: str, reason: str) -> None:
        em.trip(guardrail, task_id, message)
        task_failed(
            em,
            task_id,
            attempt,
            status(grpc.StatusCode.FAILED_PRECONDITION, message, reason),
            retry_base_s=retry_base_s,
            retry_max_s=retry_max_s,
        )

    problems = contract_problems(contract, response)
    if problems:
        refuse(G.GUARDRAIL_INVALID_OUTPUT, "; ".join(problems), "INVALID_OUTPUT")
        return
    broken = _constraint_problems(rec, writes)
    if broken:
        em.emit(
            blackboard_rolled_back=events_pb2.BlackboardRolledBack(
                to_version=rec.blackboard_version, task_id=task_id, reason="; ".join(broken)
            )
        )
        refuse(G.GUARDRAIL_BLACKBOARD, "; ".join(broken), "BLACKBOARD_CONSTRAINT")
        return
    result = events_pb2.TaskSucceeded(
        task_id=task_id,
        attempt=attempt,
        output=dict_to_struct(output_as_dict(response.output)),
        blackboard_writes=dict_to_struct(writes),
        usage=response.usage,
        confidence=response.confidence,
        has_confidence=response.has_confidence,
        summary=response.summary,
        agent_instance=agent_instance,
    )
    threshold = contract.confidence_threshold
    if response.has_confidence and threshold > 0 and response.confidence < threshold:
        em.trip(
            G.GUARDRAIL_LOW_CONFIDENCE,
            task_id,
            f"confidence {response.confidence:.2f} below {threshold:.2f}",
        )
        em.emit(
            gate_opened=events_pb2.GateOpened(
                gate_id=f"{task_id}-review",
                task_id=task_id,
                kind=GK.GATE_KIND_LOW_CONFIDENCE,
                reason=f"low confidence ({response.confidence:.2f} < {threshold:.2f}): review",
                held_result=result,
            )
        )
        return
    if response.HasField("approval_request"):
        em.emit(
            gate_opened=events_pb2.GateOpened(
                gate_id=f"{task_id}-approval",
                task_id=task_id,
                kind=GK.GATE_KIND_OUTPUT_APPROVAL,
                reason=response.approval_request.reason,
                held_result=result,
            )
        )
        return
    version_before = rec.blackboard_version
    em.emit(task_succeeded=result)
    over = (
        None
        if rec.compensating
        else _over_budget(rec) or _over_reservation(rec, task_id, response.usage)
    )
    if over:
        em.trip(G.GUARDRAIL_BUDGET, task_id, over)
        em.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, over, "BUDGET_EXHAUSTED")
        return
    if response.HasField("handoff"):
        _handoff(em, rec.tasks[task_id], response.handoff, version_before)


def _handoff(em: Emitter, source: TaskRun, handoff: agent_pb2.Handoff, version_before: int) -> None:
    rec = em.rec
    chain = sum(1 for t in rec.tasks.values() if t.root == source.root)
    routed = events_pb2.HandoffRouted(
        from_task_id=source.id,
        to_task_id=f"{source.root}.{chain}",
        capability=handoff.capability,
        reason=handoff.reason,
        input=dict_to_struct(output_as_dict(handoff.input)),
    )
    edge = (source.capability, handoff.capability, rec.blackboard_version)
    if rec.blackboard_version == version_before and edge in rec.handoffs:
        em.trip(
            G.GUARDRAIL_LOOP,
            source.id,
            f"handoff {edge[0]} -> {edge[1]} repeated with no blackboard change",
        )
        em.emit(
            gate_opened=events_pb2.GateOpened(
                gate_id=f"{source.id}-loop",
                task_id=source.id,
                kind=GK.GATE_KIND_LOOP_ESCALATION,
                reason=f"loop: {edge[0]} and {edge[1]} keep handing the task back and forth",
                held_handoff=routed,
            )
        )
        return
    em.emit(handoff_routed=routed)


def effect_outcome_unknown(em: Emitter, task_id: str, attempt: int, message: str) -> None:
    """A tool could not tell whether an effect started by a crashed executor happened:
    retrying could do it twice and failing could leave it undone, so a human decides."""
    em.emit(
        gate_opened=events_pb2.GateOpened(
            gate_id=f"{task_id}-effect-{attempt}",
            task_id=task_id,
            kind=GK.GATE_KIND_EFFECT_UNKNOWN,
            reason=(
                f"{message}: check whether it happened, resolve its idempotency record "
                "(tool proxy README, 'When a tool cannot tell'), then approve to retry"
            ),
        )
    )


def approval_required(details: ErrorDetails) -> tool_proxy_pb2.ApprovalRequired | None:
    """The approval a refused attempt waits for: the typed ``tessera.v1.ApprovalRequired``
    detail of a FAILED_PRECONDITION (sent by the tool proxy, passed on unchanged by the
    agent); None for any other failure (a reason string alone is not the contract)."""
    if details.code != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    required = details.detail(tool_proxy_pb2.ApprovalRequired)
    return required if required is not None and required.gate_id else None


def tool_approval_needed(
    em: Emitter,
    task_id: str,
    gate_id: str,
    reason: str,
    *,
    tool: str = "",
    required: tool_proxy_pb2.ApprovalRequired | None = None,
) -> None:
    """The tool proxy refused a call until a human approves it: park on that gate. On
    approval the task runs again and its retried call (same idempotency key) executes.
    ``required`` (the proxy's detail) says what the approver is shown: the call's
    arguments, already redacted, and the policies that asked."""
    opened = events_pb2.GateOpened(
        gate_id=gate_id,
        task_id=task_id,
        kind=GK.GATE_KIND_TOOL_APPROVAL,
        reason=reason or "a tool call needs approval",
        tool=tool,
    )
    if required is not None:
        opened.arguments.CopyFrom(required.arguments)
        opened.policy_ids.extend(required.policy_ids)
    em.emit(gate_opened=opened)


def decide_gate(em: Emitter, gate_id: str, *, approve: bool, decided_by: str, comment: str) -> None:
    em.emit(
        gate_decided=events_pb2.GateDecided(
            gate_id=gate_id, approved=approve, decided_by=decided_by, comment=comment
        )
    )
    if not approve:
        em.cancel(f"gate {gate_id} rejected" + (f": {comment}" if comment else ""), decided_by)


def record_approval(
    em: Emitter, gate_id: str, *, approved_by: str, quorum: int, comment: str
) -> None:
    """One approval toward ``quorum``; the gate stays open (the last one decides it)."""
    em.emit(
        gate_approval_recorded=events_pb2.GateApprovalRecorded(
            gate_id=gate_id, approved_by=approved_by, quorum=quorum, comment=comment
        )
    )


def gate_is_pending(rec: WorkflowRecord, gate_id: str) -> bool:
    gate = rec.gates.get(gate_id)
    return gate is not None and gate.state == GS.GATE_STATE_PENDING
