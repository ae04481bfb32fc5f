"""CoordinatorService RPCs. State changes go through the engine's Emitter and the store's
fenced appends; advancing workflows is the runner's job, reached through the start entry
or the work queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import structlog
from nats.js import JetStreamContext

from services.coordinator import listing, metrics
from services.coordinator.admission import Admission
from services.coordinator.engine import Emitter, decide_gate, gate_is_pending, record_approval
from services.coordinator.plans import PlanCache
from services.coordinator.settings import CoordinatorSettings
from services.coordinator.state import GS, WS, WorkflowRecord
from services.coordinator.store import Conflict, WorkflowStore, start_id
from services.coordinator.tokens import TaskTokens
from services.coordinator.tool_approvals import DecidedElsewhere, ToolApprovals
from services.coordinator.views import (
    gate_name,
    gate_view,
    workflow_id,
    workflow_view,
)
from services.coordinator.watch import follow
from tessera.policy.control_plane import ControlPlaneAuthorization
from tessera.runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tessera.runtime.history import entry_events
from tessera.runtime.principal import Principal
from tessera.runtime.telemetry import inject_headers
from tessera.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    events_pb2,
    planner_pb2,
    planner_pb2_grpc,
)

log = structlog.get_logger(__name__)

MAX_PAGE = 500
SCAN_FACTOR = 10
"""A ListWorkflows page examines at most this many workflows per result it may hold."""
CAS_ATTEMPTS = 10


async def _forward(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError) -> None:
    """Answer with a peer's error unchanged (its code and google.rpc.Status details)."""
    details = [(k, v) for k, v in (err.trailing_metadata() or ()) if k == "grpc-status-details-bin"]
    await context.abort(err.code(), err.details() or "", trailing_metadata=tuple(details))


def _workflow_attributes(rec: WorkflowRecord) -> dict[str, str]:
    """The Workflow entity policies see (policy/schema.cedarschema)."""
    return {"template": rec.graph().template if rec.plan else "", "started_by": rec.started_by}


def _same_decision(rec: WorkflowRecord, gate_id: str, approve: bool, decided_by: str) -> bool:
    """Whether ``gate_id`` was already decided exactly so, by the same person."""
    gate = rec.gates.get(gate_id)
    if gate is None or gate.decided_by != decided_by:
        return False
    wanted = GS.GATE_STATE_APPROVED if approve else GS.GATE_STATE_REJECTED
    return bool(gate.state == wanted)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        store: WorkflowStore,
        js: JetStreamContext,
        planner: planner_pb2_grpc.PlannerServiceStub,
        tokens: TaskTokens,
        settings: CoordinatorSettings,
        admission: Admission | None = None,
        tool_approvals: ToolApprovals | None = None,
        authz: ControlPlaneAuthorization | None = None,
        plans: PlanCache | None = None,
    ) -> None:
        self.admission = admission
        self.plans = plans or PlanCache(None)
        """Explicit plans the planner validated, while the registry is unchanged."""
        self.authz = authz or ControlPlaneAuthorization(None, None)
        """Who may start, cancel and decide what (off on a plaintext debug server)."""
        self.tool_approvals = tool_approvals or ToolApprovals(None)
        """Hands tool-approval decisions to the tool proxy (their owner)."""
        self.store = store
        self.js = js
        self.planner = planner
        self.tokens = tokens
        self.settings = settings

    async def _load(self, wf_id: str, *, writer: bool) -> tuple[WorkflowRecord, int]:
        loaded = await self.store.load(wf_id, writer=writer)
        if loaded is None:
            raise NotFound(
                f"workflows/{wf_id} does not exist",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow": f"workflows/{wf_id}"},
            )
        return loaded

    # -- StartWorkflow -----------------------------------------------------------------
    async def StartWorkflow(
        self,
        request: coordinator_pb2.StartWorkflowRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.StartWorkflowResponse:
        violations = []
        if not request.request_id.strip():
            violations.append(("request_id", "required: makes the start idempotent"))
        elif len(request.request_id) > 128:
            violations.append(("request_id", "at most 128 characters"))
        if not request.goal.strip() and not request.HasField("plan"):
            violations.append(("goal", "give a template name or goal, or a plan"))
        if violations:
            raise InvalidArgument("invalid StartWorkflow request", field_violations=violations)
        if request.inputs.ByteSize() > self.settings.max_input_bytes:
            raise ResourceExhausted(
                f"inputs are {request.inputs.ByteSize()} bytes; the limit is "
                f"{self.settings.max_input_bytes}",
                reason="INPUT_TOO_LARGE",
            )

        principal = await self.authz.principal(context, "StartWorkflow")
        deadline = self._deadline(request, time.time())
        wf_id = start_id(request.request_id)
        if await self.store.exists(wf_id):
            existing = await self.store.load(wf_id)
            if existing is not None:
                return await self._started_before(principal, existing[0])

        # Only new work is refused (a retried start above gets its workflow); the
        # client's retry after RetryInfo makes this start.
        if self.admission is not None:
            await self.admission.admit()
        plan = await self._plan(request, context)
        start_context: dict[str, int] = {}
        if plan.budget.max_cost_micros > 0:  # policies see cents, rounded up
            start_context["max_budget"] = -(-plan.budget.max_cost_micros // 10_000)
        await self.authz.require(
            principal,
            "start_workflow",
            "Workflow",
            wf_id,
            {"template": plan.template, "started_by": principal.name},
            context=start_context,
            workflow_id=wf_id,
            resource_name=f"workflows/{wf_id}",
        )
        rec = WorkflowRecord(id=wf_id)
        now = time.time()
        started = events_pb2.WorkflowStarted(
            request_id=request.request_id,
            goal=request.goal,
            plan=plan,
            traceparent=inject_headers({}).get("traceparent", ""),
            started_by=principal.name,
        )
        started.deadline.FromMicroseconds(int(deadline * 1e6))
        if self.settings.gate_expiry_s > 0:
            started.gate_expiry.FromMicroseconds(int(self.settings.gate_expiry_s * 1e6))
        Emitter(rec, now=now, causation_id=request.request_id).emit(workflow_started=started)
        try:
            revision = await self.store.create(rec)
        except Conflict:  # the same start, at the same time, through another replica
            existing = await self.store.load(wf_id)
            if existing is None:
                raise
            return await self._started_before(principal, existing[0])
        self.store.checkin(rec, revision)  # the start entry is the first step's message
        metrics.WORKFLOWS_STARTED.inc()
        log.info("workflow_started", workflow_id=wf_id, template=plan.template)
        return coordinator_pb2.StartWorkflowResponse(workflow=workflow_view(rec))

    async def _started_before(
        self, principal: Principal, rec: WorkflowRecord
    ) -> coordinator_pb2.StartWorkflowResponse:
        """A retried start: its workflow, to whoever may read it."""
        await self._authorize_read(principal, rec)
        if rec.state == WS.WORKFLOW_STATE_RUNNING:
            # The first attempt may have stored it but failed to enqueue its first step
            # (NATS failover); advancing is fenced, so re-sending a step is always safe
            # and nothing is left stranded.
            await self.store.enqueue(rec.id, "start retried")
        return coordinator_pb2.StartWorkflowResponse(workflow=workflow_view(rec))

    def _deadline(self, request: coordinator_pb2.StartWorkflowRequest, now: float) -> float:
        """The caller's deadline (``context.deadline``), capped; else the default."""
        latest = now + self.settings.max_workflow_deadline_s
        if request.context.HasField("deadline"):
            asked = request.context.deadline.ToMicroseconds() / 1e6
            if asked <= now:
                raise InvalidArgument(
                    "context.deadline has already passed",
                    field_violations=[("context.deadline", "must be in the future")],
                )
            return min(asked, latest)
        return now + self.settings.workflow_deadline_s

    async def _plan(
        self, request: coordinator_pb2.StartWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.TaskGraph:
        timeout = min(10.0, context.time_remaining() or 10.0)
        try:
            if request.HasField("plan"):
                key = await self.plans.key(request.plan)
                cached = self.plans.get(key)
                if cached is not None:
                    return cached
                validated = await self.planner.ValidatePlan(
                    planner_pb2.ValidatePlanRequest(context=request.context, plan=request.plan),
                    timeout=timeout,
                )
                self.plans.put(key, validated.plan)
                return validated.plan
            planned = await self.planner.Plan(
                planner_pb2.PlanRequest(
                    context=request.context,
                    goal=request.goal,
                    inputs=request.inputs,
                    budget=request.budget,
                ),
                timeout=timeout,
            )
            return planned.plan
        except grpc.aio.AioRpcError as err:
            await _forward(context, err)
            raise  # unreachable: abort raises

    # -- reads -------------------------------------------------------------------------
    async def GetWorkflow(
        self,
        request: coordinator_pb2.GetWorkflowRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.GetWorkflowResponse:
        principal = await self.authz.principal(context, "GetWorkflow")
        rec, _ = await self._load(workflow_id(request.name), writer=False)
        await self._authorize_read(principal, rec)
        return coordinator_pb2.GetWorkflowResponse(workflow=workflow_view(rec))

    async def _authorize_read(self, principal: Principal, rec: WorkflowRecord) -> None:
        await self.authz.require(
            principal,
            "read_workflow",
            "Workflow",
            rec.id,
            _workflow_attributes(rec),
            workflow_id=rec.id,
            resource_name=f"workflows/{rec.id}",
            audit_allowed=False,
        )

    def _may_read(self, principal: Principal, rec: WorkflowRecord) -> bool:
        attributes = _workflow_attributes(rec)
        return self.authz.decide(principal, "read_workflow", "Workflow", rec.id, attributes).allowed

    async def ListWorkflows(
        self,
        request: coordinator_pb2.ListWorkflowsRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.ListWorkflowsResponse:
        if request.page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative", field_violations=[("page_size", "must be >= 0")]
            )
        principal = await self.authz.principal(context, "ListWorkflows")
        size = min(request.page_size or 50, MAX_PAGE)
        before = listing.cursor_of(request)
        page: list[WorkflowRecord] = []
        examined, more = 0, True
        # A page examines a bounded number of workflows: with a rare state, it may come
        # back short, with a token to go on from (cost per page does not grow with the
        # number of workflows).
        while more and len(page) < size and examined < size * SCAN_FACTOR:
            starts, more = await self.store.starts_before(before, size)
            if not starts:
                break
            candidates: list[tuple[int, str]] = []
            for msg in reversed(starts):  # newest first
                first = entry_events(msg.data)[0]
                if listing.start_matches(first, request):
                    candidates.append((msg.seq, first.workflow_id))
            loaded = await asyncio.gather(*(self.store.load(wf) for _, wf in candidates))
            before = starts[0].seq
            for (seq, _), got in zip(candidates, loaded, strict=True):
                rec = got[0] if got is not None else None
                if rec and listing.matches(rec, request) and self._may_read(principal, rec):
                    page.append(rec)
                    if len(page) == size:
                        before = seq
                        more = more or seq != starts[0].seq
                        break
            examined += len(starts)
        response = coordinator_pb2.ListWorkflowsResponse(workflows=[workflow_view(r) for r in page])
        if more and before is not None:
            response.next_page_token = listing.next_page_token(request, before)
        return response

    async def _all(self) -> list[WorkflowRecord]:
        loaded = await asyncio.gather(*(self.store.load(i) for i in await self.store.ids()))
        return [rec for rec, _ in (x for x in loaded if x is not None)]

    async def ListGates(
        self,
        request: coordinator_pb2.ListGatesRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.ListGatesResponse:
        if request.page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative", field_violations=[("page_size", "must be >= 0")]
            )
        principal = await self.authz.principal(context, "ListGates")

        def may_decide(rec: WorkflowRecord, gate_id: str) -> bool:
            # The decision DecideGate would make for an approval, without auditing it:
            # listing decides nothing.
            resource = listing.decide_gate_resource(rec, gate_id)
            return self.authz.decide(
                principal, "decide_gate", "Gate", f"{rec.id}/{gate_id}", resource, {"approve": True}
            ).allowed

        gates = listing.pending_gates(
            await self._all(),
            may_decide,
            voter=principal.name,
            limit=min(request.page_size or 100, MAX_PAGE),
        )
        return coordinator_pb2.ListGatesResponse(gates=gates)

    async def WatchWorkflow(
        self,
        request: coordinator_pb2.WatchWorkflowRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[coordinator_pb2.WatchWorkflowResponse]:
        wf_id = workflow_id(request.name)
        principal = await self.authz.principal(context, "WatchWorkflow")
        events = follow(
            self.store,
            wf_id,
            start=max(1, request.start_sequence),
            authorize=lambda rec: self._authorize_read(principal, rec),
        )
        async for event in events:
            yield coordinator_pb2.WatchWorkflowResponse(event=event)

    # -- decisions ---------------------------------------------------------------------
    async def DecideGate(
        self,
        request: coordinator_pb2.DecideGateRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.DecideGateResponse:
        wf_id, gate_id = gate_name(request.name)
        if request.decision == coordinator_pb2.GATE_DECISION_UNSPECIFIED:
            raise InvalidArgument(
                "decision is required", field_violations=[("decision", "APPROVE or REJECT")]
            )
        approve = request.decision == coordinator_pb2.GATE_DECISION_APPROVE
        principal = await self.authz.principal(context, "DecideGate")
        decided_by = principal.name
        if not self.authz.enforcing and principal.id == "anonymous":
            decided_by = request.decided_by or "anonymous"  # plaintext debug: unverified
        quorum = 0  # 0: not authorized yet
        for _ in range(CAS_ATTEMPTS):
            rec, revision = await self._load(wf_id, writer=True)
            if not quorum and gate_id in rec.gates:
                quorum = await self._authorize_decision(
                    principal, rec, gate_id, approve, request.name
                )
            if _same_decision(rec, gate_id, approve, decided_by):
                # A retry of a stored decision (its answer was lost, or queueing its step
                # failed: no work-queue leader, say) is answered as the first was, and
                # its step queued again, or the workflow could wait forever. Sending a
                # step twice is safe: advancing is compare-and-set.
                if not rec.terminal:
                    await self.store.enqueue(wf_id, f"gate {gate_id} decision retried")
                return coordinator_pb2.DecideGateResponse(gate=gate_view(rec, gate_id))
            if not gate_is_pending(rec, gate_id):
                state = "unknown" if gate_id not in rec.gates else "already decided"
                raise FailedPrecondition(
                    f"gate {request.name} is {state}",
                    reason="GATE_NOT_PENDING",
                    violations=[("GATE_STATE", request.name, f"gate is {state}")],
                )
            if rec.terminal:
                raise FailedPrecondition(f"workflows/{wf_id} has ended", reason="WORKFLOW_ENDED")
            if approve and quorum > 1:
                approvals = rec.gates[gate_id].approvals
                if decided_by in approvals:
                    # The same person again (a retry, or an attempt to fake a quorum):
                    # counted once, the gate stays as it is.
                    return coordinator_pb2.DecideGateResponse(gate=gate_view(rec, gate_id))
                if len(approvals) + 1 < quorum:
                    em = Emitter(rec, now=time.time(), causation_id=request.name)
                    record_approval(
                        em, gate_id, approved_by=decided_by, quorum=quorum, comment=request.comment
                    )
                    try:
                        self.store.checkin(rec, await self.store.save(rec, revision))
                    except Conflict:
                        continue
                    log.info("gate_approval_recorded", workflow_id=wf_id, gate=gate_id)
                    return coordinator_pb2.DecideGateResponse(gate=gate_view(rec, gate_id))
            applied = (approve, decided_by, request.comment)
            elsewhere: DecidedElsewhere | None = None
            if rec.gates[gate_id].kind == events_pb2.GATE_KIND_TOOL_APPROVAL:
                # The tool proxy owns the approval: it must acknowledge the decision
                # before the task is re-queued, so that the retried call sees it.
                try:
                    await self.tool_approvals.decide(
                        wf_id,
                        gate_id,
                        approve=approve,
                        decided_by=decided_by,
                        time_left_s=context.time_remaining(),
                    )
                except DecidedElsewhere as exc:
                    # An earlier decision reached the proxy but not the gate (this replica
                    # or another crashed in between): the gate follows the proxy's.
                    elsewhere = exc
                    applied = (exc.approved, exc.decided_by, "decision recorded by the tool proxy")
            em = Emitter(rec, now=time.time(), causation_id=request.name)
            decide_gate(
                em,
                gate_id,
                approve=applied[0],
                decided_by=applied[1],
                comment=applied[2],
            )
            try:
                self.store.checkin(rec, await self.store.save(rec, revision))
            except Conflict:
                continue
            if rec.terminal:
                await self.tokens.revoke(wf_id, rec.token_accessors(), "gate rejected")
            else:  # running again, or compensating after a rejection
                await self.store.enqueue(wf_id, f"gate {gate_id} decided")
            log.info("gate_decided", workflow_id=wf_id, gate=gate_id, approved=applied[0])
            if elsewhere is not None:
                raise FailedPrecondition(
                    f"gate {request.name} was already decided by {elsewhere.decided_by}",
                    reason="GATE_NOT_PENDING",
                    violations=[("GATE_STATE", request.name, "gate is already decided")],
                )
            return coordinator_pb2.DecideGateResponse(gate=gate_view(rec, gate_id))
        raise Aborted(f"workflows/{wf_id} kept changing; retry", reason="CONCURRENT_UPDATE")

    async def _authorize_decision(
        self, principal: Principal, rec: WorkflowRecord, gate_id: str, approve: bool, name: str
    ) -> int:
        """Allow the decision or raise; the quorum its policy asks for."""
        return await self.authz.require(
            principal,
            "decide_gate",
            "Gate",
            f"{rec.id}/{gate_id}",
            listing.decide_gate_resource(rec, gate_id),
            context={"approve": approve},
            workflow_id=rec.id,
            resource_name=name,
        )

    async def CancelWorkflow(
        self,
        request: coordinator_pb2.CancelWorkflowRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.CancelWorkflowResponse:
        wf_id = workflow_id(request.name)
        principal = await self.authz.principal(context, "CancelWorkflow")
        authorized = False
        for _ in range(CAS_ATTEMPTS):
            rec, revision = await self._load(wf_id, writer=True)
            if not authorized:
                await self.authz.require(
                    principal,
                    "cancel_workflow",
                    "Workflow",
                    wf_id,
                    _workflow_attributes(rec),
                    workflow_id=wf_id,
                    resource_name=request.name,
                )
                authorized = True
            if rec.terminal:
                raise FailedPrecondition(
                    f"{request.name} has already ended ({WS.Name(WS.ValueType(rec.state))})",
                    reason="WORKFLOW_ENDED",
                    violations=[("WORKFLOW_STATE", request.name, WS.Name(WS.ValueType(rec.state)))],
                )
            if rec.compensating:
                raise FailedPrecondition(
                    f"{request.name} is already ending: its compensations are running",
                    reason="WORKFLOW_COMPENSATING",
                    violations=[("WORKFLOW_STATE", request.name, "WORKFLOW_STATE_COMPENSATING")],
                )
            accessors = rec.token_accessors()
            em = Emitter(rec, now=time.time(), causation_id=request.name)
            em.cancel(request.reason or "cancelled", principal.name)
            try:
                self.store.checkin(rec, await self.store.save(rec, revision))
            except Conflict:
                continue
            # The kill switch: every token of the workflow dies now, and proxies hear of it
            # (compensating tasks get tokens of their own).
            await self.tokens.revoke(wf_id, accessors, "workflow cancelled")
            if not rec.terminal:
                await self.store.enqueue(wf_id, "cancelled: compensating")
            log.info("workflow_cancelled", workflow_id=wf_id)
            return coordinator_pb2.CancelWorkflowResponse(workflow=workflow_view(rec))
        raise Aborted(f"workflows/{wf_id} kept changing; retry", reason="CONCURRENT_UPDATE")
