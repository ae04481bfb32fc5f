"""Advances workflows: consumes new workflows' start entries and "advance workflow X"
steps from the JetStream work queue, both through consumers shared by every coordinator
replica; runs ready tasks, records what follows.

A step holds its message un-acked while it runs and extends the ack deadline every
ack_wait/3; if the replica dies, JetStream redelivers the step to another replica after
ack_wait, which reloads the workflow's history and carries on (re-sending attempts that
were in flight with the same attempt number, which agents deduplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog
from google.rpc.status_pb2 import Status
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError
from opentelemetry import trace

from services.coordinator import metrics
from services.coordinator.budget import Amounts, BudgetExhausted, TaskBudgets
from services.coordinator.dispatcher import Answer, Dispatcher, NoAgent
from services.coordinator.engine import (
    Dispatch,
    Emitter,
    G,
    approval_required,
    effect_outcome_unknown,
    next_steps,
    status,
    task_answered,
    task_failed,
    tool_approval_needed,
)
from services.coordinator.settings import CoordinatorSettings
from services.coordinator.state import TS, WorkflowRecord
from services.coordinator.store import ADVANCE, STARTS_DURABLE, Conflict, WorkflowStore
from services.coordinator.tokens import TaskTokens, scoped_tools
from tessera.runtime.bus import Topology
from tessera.runtime.errors import TesseraError, error_details
from tessera.runtime.logging import bind_context, clear_context
from tessera.runtime.telemetry import extract_context
from tessera.v1 import events_pb2
from tessera.v1.agent_pb2 import AgentDescriptor
from tessera.v1.common_pb2 import CapabilityContract
from tessera.v1.registry_pb2 import FrozenAgent

log = structlog.get_logger(__name__)
tracer = trace.get_tracer(__name__)

DURABLE = "coordinator"
MAX_CONFLICTS = 20
# The longest a failure's RetryInfo may delay a task's next attempt.
MAX_RETRY_AFTER_S = 60.0
# Codes of infrastructure faults: the agent was unreachable or a dependency restarting
# (an agent hands its tool proxy's UNAVAILABLE back unchanged). Retried until the
# deadlines, without spending the task's attempts.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE}
# Reasons (ErrorInfo) that are transient whatever their code.
TRANSIENT_REASONS = {"NO_AGENT", "IDEMPOTENCY_IN_PROGRESS", "CAPABILITY_BUSY"}
# Codes after which another attempt may succeed; the rest fail the attempt for good.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.NOT_FOUND,
}


def _may_wait(event: events_pb2.WorkflowEvent) -> bool:
    """Whether an event may wait for the next append: a dispatch of an attempt that holds
    no task token (nothing for the kill switch to revoke, and a re-send of it is
    deduplicated by the agent)."""
    return event.HasField("task_dispatched") and not event.task_dispatched.token_accessor


def _started(msg: Msg) -> str:
    """The workflow a start entry (``<ns>.wf.<id>.start``) begins."""
    return msg.subject.split(".")[-2]


def _queued(msg: Msg) -> str:
    """The workflow a work step names."""
    return events_pb2.WorkStep.FromString(msg.data).workflow_id


@dataclass(frozen=True)
class InFlight:
    """One attempt being executed by an agent, and the accessor of its task token."""

    dispatch: Dispatch
    call: asyncio.Task[Answer]
    token_accessor: str


class Runner:
    def __init__(
        self,
        js: JetStreamContext,
        tokens: TaskTokens,
        topology: Topology,
        store: WorkflowStore,
        dispatcher: Dispatcher,
        settings: CoordinatorSettings,
        budgets: TaskBudgets | None = None,
    ) -> None:
        self.js = js
        self.tokens = tokens
        self.budgets = budgets or TaskBudgets(None, max_task_tool_calls=0, enabled=False)
        self.topology = topology
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slots = asyncio.Semaphore(settings.max_concurrent_steps)
        self._subs: list[tuple[JetStreamContext.PullSubscription, Callable[[Msg], str]]] = []
        self._loop_tasks: list[asyncio.Task[None]] = []
        self._steps: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._running: dict[str, tuple[str, str]] = {}
        """Task token accessor of each attempt running here → (workflow id, agent name)."""

    async def start(self) -> None:
        # The ack wait is how fast a dead replica's steps move on (settings.ack_wait_s).
        ack_wait_s = self.settings.ack_wait_s
        self._subs = [
            (await self.store.start_consumer(STARTS_DURABLE, ack_wait_s=ack_wait_s), _started),
            (await self.store.work_consumer(DURABLE, ADVANCE, ack_wait_s=ack_wait_s), _queued),
        ]
        self._loop_tasks = [
            asyncio.create_task(self._consume(sub, workflow_of), name=f"coordinator-consume-{i}")
            for i, (sub, workflow_of) in enumerate(self._subs)
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for loop in self._loop_tasks:
            loop.cancel()
        await asyncio.gather(*self._loop_tasks, return_exceptions=True)
        for step in list(self._steps):
            step.cancel()
        await asyncio.gather(*self._steps, return_exceptions=True)
        # A pull subscription left open makes the connection's drain wait its full timeout.
        for sub, _ in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _consume(
        self, sub: JetStreamContext.PullSubscription, workflow_of: Callable[[Msg], str]
    ) -> None:
        while not self._stopping.is_set():
            # Fetch only for slots held, and no more than are free now: a fetched message
            # has no heartbeat until its step starts, so one left waiting for a slot would
            # be redelivered after ack_wait while this replica is alive.
            await self._slots.acquire()
            held = 1
            while held < 32 and not self._slots.locked():
                await self._slots.acquire()
                held += 1
            try:
                msgs = await sub.fetch(batch=held, timeout=1.0)
            except (TimeoutError, FetchTimeoutError):
                msgs = []
            except Exception as exc:  # a NATS outage: back off, the client reconnects
                log.warning("work_fetch_failed", error=repr(exc))
                msgs = []
                await asyncio.sleep(0.5)
            for _ in range(held - len(msgs)):
                self._slots.release()
            for msg in msgs:  # each holds one of the slots taken above
                try:
                    wf_id = workflow_of(msg)
                except Exception:  # only the coordinator publishes here: nothing to retry
                    log.error("work_step_unreadable", subject=msg.subject)
                    self._slots.release()
                    with contextlib.suppress(Exception):
                        await msg.term()
                    continue
                task = asyncio.create_task(self._handle(msg, wf_id))
                self._steps.add(task)
                task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[None]) -> None:
        self._steps.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg, wf_id: str) -> None:
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        deliveries = msg.metadata.num_delivered
        if deliveries > 1:
            # After a replica died, a failed step (nak), or a live step whose heartbeat
            # was late by more than ack_wait (a stalled replica: see settings.ack_wait_s).
            metrics.STEPS_REDELIVERED.inc()
            log.info("work_step_redelivered", workflow_id=wf_id, deliveries=deliveries)
        try:
            async with self._locks[wf_id]:
                await self.advance(wf_id)
            await msg.ack()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("step_failed", workflow_id=wf_id)
            await msg.nak(delay=1.0)
        finally:
            heartbeat.cancel()
            lock = self._locks.get(wf_id)
            if lock is not None and not lock.locked():
                self._locks.pop(wf_id, None)

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.settings.ack_wait_s / 3)
            await msg.in_progress()

    async def advance(self, wf_id: str) -> None:
        """Run the workflow until it finishes, parks on a gate, or another writer wins."""
        loaded = await self.store.load(wf_id, writer=True)
        if loaded is None:
            log.warning("step_for_unknown_workflow", workflow_id=wf_id)
            return
        rec, revision = loaded
        if rec.terminal:
            return  # a step re-sent after the workflow ended
        bind_context(workflow_id=wf_id)
        # Continue the workflow's own trace, so every step and agent call joins it.
        parent = extract_context({"traceparent": rec.traceparent} if rec.traceparent else {})
        with tracer.start_as_current_span(
            "workflow.step", context=parent, attributes={"tessera.workflow_id": wf_id}
        ):
            await self._advance(rec, revision)

    async def _advance(self, rec: WorkflowRecord, revision: int) -> None:
        wf_id = rec.id
        in_flight: dict[str, InFlight] = {}
        conflicts = 0
        # Answers collected are applied in memory (their events wait in rec.outbox) and
        # appended together with the dispatches they lead to, one entry for both. A crash
        # in between loses nothing: the attempts are still RUNNING in the history, so
        # they are sent again with the same attempt number and the agents answer from
        # their dedup records.
        started = time.monotonic()
        try:
            while True:
                try:
                    revision = await self._tick(rec, revision, in_flight)
                    if rec.outbox and not await self._answered_within(in_flight):
                        revision = await self.store.save(rec, revision)
                except Conflict:
                    conflicts += 1
                    if conflicts > MAX_CONFLICTS:
                        raise
                    reloaded = await self.store.load(wf_id)
                    if reloaded is None:
                        return
                    rec, revision = reloaded
                    continue
                if rec.terminal:
                    break
                if not in_flight:
                    wait = self._next_retry_in(rec)
                    if wait is None:
                        break  # parked on a gate
                    await asyncio.sleep(wait)
                    continue
                await asyncio.wait(
                    [f.call for f in in_flight.values()], return_when=asyncio.FIRST_COMPLETED
                )
                if self._collect(rec, in_flight):
                    await self.budgets.settle(rec)
        finally:
            for flight in in_flight.values():
                flight.call.cancel()
                self._running.pop(flight.token_accessor, None)
            metrics.STEP_SECONDS.observe(time.monotonic() - started)
            clear_context()
        if rec.terminal:
            metrics.WORKFLOWS_FINISHED.labels(state=str(rec.state)).inc()
            # The kill switch also fires on normal ends: no task token outlives its workflow.
            self.tokens.revoke_soon(rec.id, rec.token_accessors(), "workflow ended")
            await self.budgets.drop(rec)
        else:
            self.store.checkin(rec, revision)

    async def agent_frozen(self, frozen: FrozenAgent) -> None:
        """An operator froze ``frozen.name``: revoke the task tokens of its attempts
        running here, so their next tool call is refused (the policy refuses it too)."""
        by_workflow: defaultdict[str, list[str]] = defaultdict(list)
        for accessor, (wf_id, agent) in self._running.items():
            if agent == frozen.name:
                by_workflow[wf_id].append(accessor)
        for wf_id, accessors in by_workflow.items():
            self.tokens.revoke_soon(wf_id, accessors, f"agent {frozen.name} frozen")

    def _next_retry_in(self, rec: WorkflowRecord) -> float | None:
        now = time.time()
        due = [
            t.retry_at
            for t in rec.tasks.values()
            if t.state == TS.TASK_STATE_PENDING and t.retry_at is not None
        ]
        if not due or rec.terminal:
            return None
        return max(0.0, min(due) - now)

    async def _tick(
        self, rec: WorkflowRecord, revision: int, in_flight: dict[str, InFlight]
    ) -> int:
        """Decide what runs next, append it (with the answers collected since the last
        append), then send the attempts. An attempt that gets a task token is never sent
        before the entry that records it (the kill switch must find its token); one
        without may be recorded with its answer (:meth:`_answered_within`)."""
        em = Emitter(rec, now=time.time())
        dispatches = next_steps(em, in_flight=set(in_flight))
        picked: list[tuple[Dispatch, AgentDescriptor, CapabilityContract]] = []
        for dispatch in dispatches:
            try:
                agent, contract = await self.dispatcher.pick(dispatch.capability, dispatch.version)
            except NoAgent as exc:
                # Waits (visible as NO_AGENT) until a replica registers or time runs out.
                self._fail_attempt(
                    em,
                    dispatch,
                    status(grpc.StatusCode.UNAVAILABLE, str(exc), "NO_AGENT"),
                    transient=True,
                )
                continue
            picked.append((dispatch, agent, contract))
        shares = self._budget_shares(rec, picked)
        ready: list[tuple[Dispatch, AgentDescriptor, CapabilityContract, str, str]] = []
        for dispatch, agent, contract in picked:
            reserved = None
            share = shares.get(dispatch.task_id)
            if share is not None:
                try:
                    reserved = await self.budgets.reserve(
                        rec,
                        dispatch.task_id,
                        dispatch.attempt,
                        share,
                        mirrored=self.tokens.issues(rec, dispatch, contract),
                    )
                except BudgetExhausted as exc:
                    self._budget_refused(em, dispatch, exc)
                    continue
                except TesseraError as exc:  # the ledger is unreachable: nothing unreserved
                    self._fail_attempt(
                        em, dispatch, status(exc.code, exc.message, exc.reason), transient=True
                    )
                    continue
            try:
                token = await self.tokens.issue(
                    rec, dispatch, contract, agent.name, reserved=reserved
                )
            except TesseraError as exc:  # Vault unreachable: the agent never runs unscoped
                self._fail_attempt(
                    em,
                    dispatch,
                    status(exc.code, exc.message, exc.reason),
                    transient=exc.code in (TRANSIENT | {grpc.StatusCode.DEADLINE_EXCEEDED}),
                )
                continue
            accessor = token.accessor if token is not None else ""
            task = rec.tasks[dispatch.task_id]
            if not (task.state == TS.TASK_STATE_RUNNING and task.attempts == dispatch.attempt):
                em.emit(
                    task_dispatched=events_pb2.TaskDispatched(
                        task_id=dispatch.task_id,
                        capability=dispatch.capability,
                        attempt=dispatch.attempt,
                        agent_instance=agent.instance_id,
                        token_accessor=accessor,
                        side_effect_class=contract.side_effect_class,
                        compensation=contract.compensation,
                        reserved=reserved.as_usage() if reserved is not None else None,
                    )
                )
            ready.append((dispatch, agent, contract, token.token if token else "", accessor))
        if not all(_may_wait(e) for e in rec.outbox):
            revision = await self.store.save(rec, revision)
        for dispatch, agent, contract, token_value, accessor in ready:
            request = self.dispatcher.request(rec, dispatch, contract, task_token=token_value)
            metrics.TASKS_DISPATCHED.labels(capability=dispatch.capability).inc()
            call = asyncio.create_task(
                self.dispatcher.send(agent, contract, request, dispatch.timeout_s)
            )
            in_flight[dispatch.task_id] = InFlight(dispatch, call, accessor)
            if accessor:
                self._running[accessor] = (rec.id, agent.name)
        return revision

    async def _answered_within(self, in_flight: dict[str, InFlight]) -> bool:
        """Wait up to ``settings.dispatch_append_delay_s`` for an attempt to answer, so
        that dispatches holding no credential are appended with the first answer (one
        write for both) instead of on their own; whether one answered. A crash before the
        append only re-sends those attempts, under the same numbers."""
        if not in_flight:
            return False
        done, _ = await asyncio.wait(
            [f.call for f in in_flight.values()],
            timeout=self.settings.dispatch_append_delay_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        return bool(done)

    def _budget_shares(
        self,
        rec: WorkflowRecord,
        picked: list[tuple[Dispatch, AgentDescriptor, CapabilityContract]],
    ) -> dict[str, tuple[Amounts, Amounts]]:
        """What each attempt about to be dispatched asks of the workflow's budget."""
        needs = {d.task_id: bool(scoped_tools(c, rec.tasks[d.task_id].tools)) for d, _, c in picked}
        resent = {
            d.task_id
            for d, _, _ in picked
            if rec.tasks[d.task_id].state == TS.TASK_STATE_RUNNING
            and rec.tasks[d.task_id].attempts == d.attempt
        }
        return self.budgets.shares(rec, needs, resent=resent)

    def _budget_refused(self, em: Emitter, dispatch: Dispatch, exc: BudgetExhausted) -> None:
        """No slice left: wait while running attempts hold the rest (they settle soon);
        otherwise the budget is spent and the task fails (early stop)."""
        error = status(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, exc.reason)
        if exc.held:
            self._fail_attempt(em, dispatch, error, transient=True, retry_after_s=exc.retry_after_s)
            return
        em.trip(G.GUARDRAIL_BUDGET, dispatch.task_id, exc.message)
        self._fail_attempt(em, dispatch, error, retryable=False)

    def _fail_attempt(
        self,
        em: Emitter,
        dispatch: Dispatch,
        error: Status,
        *,
        retryable: bool = True,
        transient: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        task_failed(
            em,
            dispatch.task_id,
            dispatch.attempt,
            error,
            retryable=retryable,
            transient=transient,
            retry_base_s=self.settings.retry_base_s,
            retry_max_s=(
                self.settings.transient_retry_max_s if transient else self.settings.retry_max_s
            ),
            # Bounded: a peer cannot park a task indefinitely.
            retry_after_s=min(retry_after_s or 0.0, MAX_RETRY_AFTER_S),
        )

    def _collect(self, rec: WorkflowRecord, in_flight: dict[str, InFlight]) -> bool:
        """Apply the answers of finished attempts to ``rec`` (in memory: the next tick
        saves them); whether any event was emitted."""
        em = Emitter(rec, now=time.time())
        for task_id, flight in list(in_flight.items()):
            dispatch, call = flight.dispatch, flight.call
            if not call.done():
                continue
            del in_flight[task_id]
            self._running.pop(flight.token_accessor, None)
            self.tokens.revoke_soon(rec.id, [flight.token_accessor], "task attempt ended")
            task = rec.tasks.get(task_id)
            if (
                task is None
                or task.state != TS.TASK_STATE_RUNNING
                or task.attempts != dispatch.attempt
                or rec.terminal
            ):
                continue  # someone else already recorded this attempt
            try:
                answer = call.result()
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = error_details(exc)
                required = approval_required(details)
                if required is not None:
                    tool_approval_needed(
                        em,
                        task_id,
                        required.gate_id,
                        required.reason or details.message,
                        tool=required.tool,
                        required=required,
                    )
                    continue
                if details.reason == "EFFECT_OUTCOME_UNKNOWN":
                    effect_outcome_unknown(
                        em, task_id, dispatch.attempt, exc.details() or details.reason
                    )
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    em.trip(
                        G.GUARDRAIL_TIMEOUT,
                        task_id,
                        f"attempt {dispatch.attempt} ran past {dispatch.timeout_s:g}s",
                    )
                self._fail_attempt(
                    em,
                    dispatch,
                    status(code, exc.details() or code.name, details.reason or code.name),
                    retryable=code in RETRYABLE,
                    transient=code in TRANSIENT or details.reason in TRANSIENT_REASONS,
                    retry_after_s=details.retry_after_s,
                )
                metrics.TASK_OUTCOMES.labels(
                    capability=dispatch.capability, outcome=code.name.lower()
                ).inc()
                continue
            task_answered(
                em,
                dispatch,
                answer.response,
                answer.contract,
                agent_instance=answer.agent_instance,
                retry_base_s=self.settings.retry_base_s,
                retry_max_s=self.settings.retry_max_s,
            )
            metrics.TASK_OUTCOMES.labels(capability=dispatch.capability, outcome="answered").inc()
            if answer.response.HasField("handoff"):
                metrics.HANDOFFS.inc()
        for event in em.events:
            if event.HasField("guardrail_tripped"):
                metrics.GUARDRAILS.labels(
                    guardrail=events_pb2.Guardrail.Name(event.guardrail_tripped.guardrail)
                ).inc()
        return bool(em.events)
