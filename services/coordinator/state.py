"""A workflow's state, rebuilt from its events by one reducer (`apply_event`).

The coordinator never changes state except by appending an event and applying it, so the
KV snapshot and the event history can never disagree: replaying the history through
`apply_event` yields the snapshot (a property test checks it).
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel, Field, PrivateAttr

from tessera.audit.scrub import scrub
from tessera.v1 import common_pb2, coordinator_pb2, events_pb2, planner_pb2

WS = coordinator_pb2.WorkflowState
TS = coordinator_pb2.TaskState
GS = coordinator_pb2.GateState

TERMINAL_WORKFLOW = frozenset(
    {
        WS.WORKFLOW_STATE_SUCCEEDED,
        WS.WORKFLOW_STATE_FAILED,
        WS.WORKFLOW_STATE_CANCELLED,
        WS.WORKFLOW_STATE_COMPENSATED,
    }
)
DEFAULT_TIMEOUT_S = 30.0
# Gates after whose approval the task runs again (its retried tool call now goes ahead).
_RUN_AGAIN_GATES = frozenset(
    {events_pb2.GATE_KIND_TOOL_APPROVAL, events_pb2.GATE_KIND_EFFECT_UNKNOWN}
)
DEFAULT_ATTEMPTS = 3


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


def dict_to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(value)
    return out


class ErrorRec(BaseModel):
    code: int
    message: str
    reason: str = ""


class Usage(BaseModel):
    tokens: int = 0
    cost_micros: int = 0
    tool_calls: int = 0


class TaskRun(BaseModel):
    id: str
    kind: int = planner_pb2.TASK_KIND_AGENT
    capability: str = ""
    version: str = ""
    depends_on: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_attempts: int = DEFAULT_ATTEMPTS
    optional: bool = False
    gate_reason: str = ""
    input: dict[str, Any] = Field(default_factory=dict)
    state: int = TS.TASK_STATE_PENDING
    attempts: int = 0
    retry_at: float | None = None
    error: ErrorRec | None = None
    output: dict[str, Any] | None = None
    agent: str = ""
    summary: str = ""
    next: str | None = None
    """The task this one handed off to, if any: dependents wait for the chain's end."""
    root: str = ""
    token_accessor: str = ""
    """Accessor of the task token of the latest attempt (never the token)."""
    deadline_s: float = 0.0
    """Bound on the task's whole life from its first attempt (0: the workflow's)."""
    since: float | None = None
    """When its first attempt was made or tried."""
    failures: int = 0
    """Attempts the agent itself failed: these, not transient faults, spend
    max_attempts."""
    transient: bool = False
    """The last failure was the infrastructure's (see TaskFailed.transient)."""
    transient_failures: int = 0
    """Transient failures in a row (the backoff grows with them)."""
    counted: bool = False
    """The current execution already counts as an iteration: a resend after a
    transient fault or a crash is the same execution."""
    side_effect_class: int = common_pb2.SIDE_EFFECT_CLASS_UNSPECIFIED
    """From the contract of its latest attempt."""
    compensation: str = ""
    """The contract's compensating capability (empty: its effects cannot be undone)."""
    compensates: str = ""
    """For a compensating task: the task whose effects it undoes."""
    ended_at: float | None = None
    """When its latest attempt ended (compensations run in reverse order of it)."""
    reserved: Usage | None = None
    """What its latest attempt reserved from the workflow's budget (TaskDispatched.reserved;
    None: nothing was reserved, e.g. a compensation, or a coordinator without a ledger)."""

    def deadline(self, workflow_deadline: float) -> float:
        """The absolute time this task must be done by (0: none)."""
        own = self.since + self.deadline_s if self.deadline_s and self.since else 0.0
        bounds = [b for b in (own, workflow_deadline) if b]
        return min(bounds) if bounds else 0.0


class GateRec(BaseModel):
    id: str
    task_id: str
    reason: str
    kind: int
    state: int = GS.GATE_STATE_PENDING
    decided_by: str = ""
    comment: str = ""
    create_time: float = 0.0
    decide_time: float = 0.0
    tool: str = ""
    """The tool whose call waits on it (tool approvals)."""
    arguments: dict[str, Any] = Field(default_factory=dict)
    """That call's arguments as approvers see them (redacted by the tool proxy)."""
    policy_ids: list[str] = Field(default_factory=list)
    """The policies that asked for the approval."""
    approvals: list[str] = Field(default_factory=list)
    """Who approved so far (gates whose policy asks for a quorum)."""
    quorum: int = 1
    expire_time: float = 0.0
    """When it resolves as rejected if still pending (0: never)."""
    held: str = ""
    """Serialized GateOpened (base64) holding a result or handoff until approval."""


class WorkflowRecord(BaseModel):
    """One workflow's state: what its history's events add up to (internal to the
    coordinator; stored now and then as a KV snapshot, services/coordinator/store.py)."""

    id: str
    request_id: str = ""
    goal: str = ""
    started_by: str = ""
    """The verified principal who started it (a person's name or ``service/operator``)."""
    state: int = WS.WORKFLOW_STATE_PENDING
    plan: str = ""
    """Serialized TaskGraph (base64)."""
    tasks: dict[str, TaskRun] = Field(default_factory=dict)
    gates: dict[str, GateRec] = Field(default_factory=dict)
    blackboard: dict[str, Any] = Field(default_factory=dict)
    blackboard_version: int = 0
    usage: Usage = Field(default_factory=Usage)
    iterations: int = 0
    handoffs: list[tuple[str, str, int]] = Field(default_factory=list)
    """(from capability, to capability, blackboard version) of every routed handoff."""
    result: dict[str, Any] | None = None
    partial: bool = False
    error: ErrorRec | None = None
    seq: int = 0
    create_time: float = 0.0
    update_time: float = 0.0
    traceparent: str = ""
    """Trace of the start request; every step continues it."""
    deadline: float = 0.0
    """When a still running workflow fails (0: never); gate waits extend it."""
    gate_expiry_s: float = 0.0
    """How long each of its gates stays open before it resolves as rejected (0: never)."""
    ending: str = ""
    """While compensating: the serialized CompensationStarted (base64), saying why the
    workflow ends once its compensations ran."""
    compensated: list[str] = Field(default_factory=list)
    uncompensated: list[str] = Field(default_factory=list)
    history_seq: int = 0
    """Stream sequence of the last history entry applied (0: none yet)."""

    # -- in memory only ---------------------------------------------------------------
    _outbox: list[events_pb2.WorkflowEvent] = PrivateAttr(default_factory=list)
    _tail_bytes: int = PrivateAttr(default=0)
    """Bytes of history appended since the last snapshot."""
    _state_bytes: int = PrivateAttr(default=0)
    """Size of the state when last serialized (a snapshot's size, when loaded from one)."""
    _graph: planner_pb2.TaskGraph | None = PrivateAttr(default=None)

    @property
    def outbox(self) -> list[events_pb2.WorkflowEvent]:
        """Events applied to this record and not yet appended to its history (the next
        save appends them, all in one entry)."""
        return self._outbox

    def graph(self) -> planner_pb2.TaskGraph:
        """The plan, decoded once per snapshot (several decisions per step read it)."""
        if self._graph is None:
            self._graph = planner_pb2.TaskGraph.FromString(base64.b64decode(self.plan))
        return self._graph

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_WORKFLOW

    def chain_end(self, task_id: str) -> TaskRun:
        task = self.tasks[task_id]
        while task.next is not None:
            task = self.tasks[task.next]
        return task

    def resolved(self, task_id: str) -> bool:
        """Whether dependents of `task_id` may run: its handoff chain ended."""
        end = self.chain_end(task_id)
        if end.state == TS.TASK_STATE_SUCCEEDED or end.state == TS.TASK_STATE_SKIPPED:
            return True
        return end.state == TS.TASK_STATE_FAILED and self.tasks[task_id].optional

    def pending_gates(self) -> list[GateRec]:
        return [g for g in self.gates.values() if g.state == GS.GATE_STATE_PENDING]

    def next_gate_expiry(self) -> float | None:
        """When the first of its pending gates expires (None: none will)."""
        due = [g.expire_time for g in self.pending_gates() if g.expire_time]
        return min(due) if due else None

    def token_accessors(self) -> list[str]:
        return [t.token_accessor for t in self.tasks.values() if t.token_accessor]

    @property
    def compensating(self) -> bool:
        return bool(self.ending)

    def ending_event(self) -> events_pb2.CompensationStarted:
        return events_pb2.CompensationStarted.FromString(base64.b64decode(self.ending))

    def max_iterations(self) -> int:
        graph = self.graph()
        caps = [c for c in (graph.max_iterations, graph.budget.max_iterations) if c > 0]
        return min(caps) if caps else 0


def _ts(event: events_pb2.WorkflowEvent) -> float:
    return event.time.ToMicroseconds() / 1e6


def _error(status: Any) -> ErrorRec:
    reason = ""
    from google.rpc import error_details_pb2

    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return ErrorRec(code=status.code, message=status.message, reason=reason)


def _task_from_spec(spec: planner_pb2.TaskSpec) -> TaskRun:
    return TaskRun(
        id=spec.id,
        kind=spec.kind or planner_pb2.TASK_KIND_AGENT,
        capability=spec.capability,
        version=spec.version,
        depends_on=list(spec.depends_on),
        tools=list(spec.tools),
        timeout_s=spec.timeout.ToMilliseconds() / 1000
        if spec.HasField("timeout")
        else DEFAULT_TIMEOUT_S,
        max_attempts=spec.max_attempts or DEFAULT_ATTEMPTS,
        optional=spec.optional,
        gate_reason=spec.gate_reason,
        input=struct_to_dict(spec.input),
        root=spec.id,
        deadline_s=spec.deadline.ToMilliseconds() / 1000 if spec.HasField("deadline") else 0.0,
    )


def add_usage(total: Usage, usage: common_pb2.Usage) -> None:
    total.tokens += usage.tokens
    total.cost_micros += usage.cost_micros
    total.tool_calls += usage.tool_calls


def _accept_result(rec: WorkflowRecord, result: events_pb2.TaskSucceeded) -> None:
    task = rec.tasks[result.task_id]
    task.state = TS.TASK_STATE_SUCCEEDED
    task.output = struct_to_dict(result.output)
    task.summary = result.summary
    task.agent = result.agent_instance
    task.error = None
    task.transient = False
    task.transient_failures = 0
    writes = struct_to_dict(result.blackboard_writes)
    if writes:
        rec.blackboard.update(writes)
        rec.blackboard_version += 1


def _route_handoff(rec: WorkflowRecord, handoff: events_pb2.HandoffRouted) -> None:
    source = rec.tasks[handoff.from_task_id]
    rec.tasks[handoff.to_task_id] = TaskRun(
        id=handoff.to_task_id,
        capability=handoff.capability,
        input=struct_to_dict(handoff.input),
        root=source.root,
        tools=list(source.tools),  # the plan step authorizes the tools of its whole chain
        optional=source.optional,
        timeout_s=source.timeout_s,
        max_attempts=source.max_attempts,
        deadline_s=source.deadline_s,
    )
    source.next = handoff.to_task_id
    rec.handoffs.append((source.capability, handoff.capability, rec.blackboard_version))


def _start_compensation(rec: WorkflowRecord, started: events_pb2.CompensationStarted) -> None:
    """Stop the workflow's own work and add the compensating tasks, chained in order."""
    rec.state = WS.WORKFLOW_STATE_COMPENSATING
    rec.ending = base64.b64encode(started.SerializeToString(deterministic=True)).decode()
    rec.uncompensated = list(started.uncompensated)
    rec.deadline = started.deadline.ToMicroseconds() / 1e6 if started.HasField("deadline") else 0.0
    for task in rec.tasks.values():
        if task.state in (
            TS.TASK_STATE_PENDING,
            TS.TASK_STATE_RUNNING,
            TS.TASK_STATE_WAITING_APPROVAL,
        ):
            task.state = TS.TASK_STATE_SKIPPED  # a late answer of a running one is ignored
    for gate in rec.gates.values():
        if gate.state == GS.GATE_STATE_PENDING:
            gate.state = GS.GATE_STATE_REJECTED
            gate.comment = "the workflow ended before a decision"
    not_before = (
        started.not_before.ToMicroseconds() / 1e6 if started.HasField("not_before") else None
    )
    previous: str | None = None
    for undo in started.tasks:
        source = rec.tasks[undo.from_task_id]
        rec.tasks[undo.to_task_id] = TaskRun(
            id=undo.to_task_id,
            capability=undo.capability,
            input=struct_to_dict(undo.input),
            root=undo.to_task_id,
            depends_on=[previous] if previous else [],
            tools=list(source.tools),  # the plan step authorized its undoing too
            timeout_s=source.timeout_s,
            max_attempts=max(DEFAULT_ATTEMPTS, source.max_attempts),
            optional=True,  # one failed compensation does not stop the others
            compensates=source.id,
            retry_at=None if previous else not_before,  # the chain's first waits to settle
        )
        previous = undo.to_task_id


def _end(rec: WorkflowRecord, state: int, compensated: Any, uncompensated: Any) -> None:
    rec.compensated = list(compensated)
    rec.uncompensated = list(uncompensated)
    undone_all = rec.compensating and rec.compensated and not rec.uncompensated
    rec.state = WS.WORKFLOW_STATE_COMPENSATED if undone_all else state


def apply_event(rec: WorkflowRecord, event: events_pb2.WorkflowEvent) -> None:
    """Apply one event to the snapshot. Pure and deterministic."""
    kind = event.WhichOneof("kind")
    now = _ts(event)
    rec.seq = event.sequence
    rec.update_time = now
    if kind == "workflow_started":
        started = event.workflow_started
        rec.request_id = started.request_id
        rec.goal = started.goal
        rec.started_by = started.started_by
        rec.traceparent = started.traceparent
        rec.deadline = (
            started.deadline.ToMicroseconds() / 1e6 if started.HasField("deadline") else 0.0
        )
        rec.gate_expiry_s = started.gate_expiry.ToMicroseconds() / 1e6
        rec.plan = base64.b64encode(started.plan.SerializeToString()).decode()
        rec._graph = None
        rec.tasks = {spec.id: _task_from_spec(spec) for spec in started.plan.tasks}
        rec.blackboard = struct_to_dict(started.plan.blackboard)
        rec.blackboard_version = 1
        rec.state = WS.WORKFLOW_STATE_RUNNING
        rec.create_time = now
    elif kind == "task_dispatched":
        task = rec.tasks[event.task_dispatched.task_id]
        if event.task_dispatched.attempt > task.attempts and not task.counted:
            rec.iterations += 1
        task.counted = True
        task.since = task.since or now
        task.side_effect_class = event.task_dispatched.side_effect_class
        task.compensation = event.task_dispatched.compensation
        task.attempts = event.task_dispatched.attempt
        task.state = TS.TASK_STATE_RUNNING
        task.retry_at = None
        task.agent = event.task_dispatched.agent_instance
        task.token_accessor = event.task_dispatched.token_accessor
        reserved = event.task_dispatched.reserved
        task.reserved = (
            Usage(
                tokens=reserved.tokens,
                cost_micros=reserved.cost_micros,
                tool_calls=reserved.tool_calls,
            )
            if event.task_dispatched.HasField("reserved")
            else None
        )
    elif kind == "task_succeeded":
        result = event.task_succeeded
        add_usage(rec.usage, result.usage)
        _accept_result(rec, result)
        rec.tasks[result.task_id].ended_at = now
    elif kind == "task_failed":
        failed = event.task_failed
        task = rec.tasks[failed.task_id]
        task.error = _error(failed.error)
        task.since = task.since or now
        task.ended_at = now
        task.transient = failed.transient
        if failed.transient:
            task.transient_failures += 1
        else:
            task.failures += 1
            task.transient_failures = 0
            task.counted = False
        if failed.will_retry:
            task.state = TS.TASK_STATE_PENDING
            task.retry_at = failed.retry_time.ToMicroseconds() / 1e6
        else:
            task.state = TS.TASK_STATE_FAILED
    elif kind == "task_skipped":
        rec.tasks[event.task_skipped.task_id].state = TS.TASK_STATE_SKIPPED
    elif kind == "handoff_routed":
        _route_handoff(rec, event.handoff_routed)
    elif kind == "gate_opened":
        opened = event.gate_opened
        rec.gates[opened.gate_id] = GateRec(
            id=opened.gate_id,
            task_id=opened.task_id,
            reason=opened.reason,
            kind=opened.kind,
            tool=opened.tool,
            arguments=scrub(struct_to_dict(opened.arguments)),
            policy_ids=list(opened.policy_ids),
            create_time=now,
            expire_time=opened.expire_time.ToMicroseconds() / 1e6
            if opened.HasField("expire_time")
            else 0.0,
            held=base64.b64encode(opened.SerializeToString()).decode()
            if opened.HasField("held_result") or opened.HasField("held_handoff")
            else "",
        )
        if opened.HasField("held_result"):
            add_usage(rec.usage, opened.held_result.usage)
        if opened.task_id in rec.tasks:
            rec.tasks[opened.task_id].state = TS.TASK_STATE_WAITING_APPROVAL
        rec.state = WS.WORKFLOW_STATE_WAITING_APPROVAL
    elif kind == "gate_approval_recorded":
        vote = event.gate_approval_recorded
        gate = rec.gates[vote.gate_id]
        gate.approvals.append(vote.approved_by)
        gate.quorum = vote.quorum
    elif kind == "gate_decided":
        decided = event.gate_decided
        gate = rec.gates[decided.gate_id]
        gate.state = GS.GATE_STATE_APPROVED if decided.approved else GS.GATE_STATE_REJECTED
        gate.decided_by = decided.decided_by
        if decided.approved and decided.decided_by not in gate.approvals:
            gate.approvals.append(decided.decided_by)
        gate.comment = decided.comment
        gate.decide_time = now
        if rec.deadline:
            rec.deadline += max(0.0, now - gate.create_time)  # the deadline bounds work, not humans
        gated = rec.tasks.get(gate.task_id)
        if decided.approved and gated is not None:
            held = (
                events_pb2.GateOpened.FromString(base64.b64decode(gate.held)) if gate.held else None
            )
            if held is not None and held.HasField("held_result"):
                _accept_result(rec, held.held_result)
            elif held is not None and held.HasField("held_handoff"):
                gated.state = TS.TASK_STATE_SUCCEEDED
                rec.handoffs.clear()  # a human let the loop go on: start counting afresh
                _route_handoff(rec, held.held_handoff)
            elif gate.kind in _RUN_AGAIN_GATES:
                gated.state = TS.TASK_STATE_PENDING  # run again: the tool call is now approved
                gated.retry_at = None
                gated.counted = False
            else:
                gated.state = TS.TASK_STATE_SUCCEEDED
        gate.held = ""
        if not rec.pending_gates() and not rec.terminal:
            rec.state = WS.WORKFLOW_STATE_RUNNING
    elif kind == "workflow_completed":
        rec.state = WS.WORKFLOW_STATE_SUCCEEDED
        rec.result = struct_to_dict(event.workflow_completed.result)
        rec.partial = event.workflow_completed.partial
    elif kind == "compensation_started":
        _start_compensation(rec, event.compensation_started)
    elif kind == "workflow_failed":
        failed_wf = event.workflow_failed
        rec.error = _error(failed_wf.error)
        _end(rec, WS.WORKFLOW_STATE_FAILED, failed_wf.compensated, failed_wf.uncompensated)
    elif kind == "workflow_cancelled":
        cancelled = event.workflow_cancelled
        rec.error = ErrorRec(code=1, message=cancelled.reason, reason="CANCELLED")
        _end(rec, WS.WORKFLOW_STATE_CANCELLED, cancelled.compensated, cancelled.uncompensated)
    # blackboard_rolled_back and guardrail_tripped are records only: refused writes were
    # never applied, so the blackboard already is the last valid version.
