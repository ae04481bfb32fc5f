"""PolicyService RPCs: Check, ReloadPolicies, GetPolicySet.

Check fails closed: only an explicit Cedar Allow allows. Its decision record:

* ``decision_audit = "sync"``: no decision is answered before its audit record is
  acknowledged (UNAVAILABLE otherwise), so the first Check after the audit stream broke is
  already refused.
* ``decision_audit = "async"`` (default): the record is deferred
  (:meth:`~tessera.audit.AuditWriter.defer`): it rides on the chain's next record or is
  written within the writer's linger (50 ms), many decisions per stored record ("audit
  records are published asynchronously with back-pressure", DESIGN.md, Hot path). Check
  answers UNAVAILABLE (AUDIT_UNAVAILABLE) while the backlog is full or the last write
  failed: fail closed, but only from the first failure *observed*, so decisions answered
  just before it may still be deferred. Deferred records are retried, in order, until
  written; those still deferred when the process dies are lost. What keeps tool calls
  fully audited anyway: the tool proxy writes its own ``allow`` record (decision id,
  decision, determining policies, policy set version) and waits for its ack before any
  tool runs, so an executed call is never unaudited; what is given up is only the policy
  service's own copy of the decision for a bounded window (the linger, or the outage)
  around a crash or an audit outage. Saves a JetStream round trip (~0.3 ms) plus most of
  the record's cost on every Check.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import structlog

from services.policy.coverage_report import CoverageReports
from tessera.audit import AuditWriter
from tessera.policy.check import check_input, check_response
from tessera.policy.engine import (
    LoadedPolicySet,
    PolicyLoadError,
    RequestInvalid,
    Verdict,
    evaluate,
)
from tessera.policy.store import PolicyStore
from tessera.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from tessera.v1 import audit_pb2, policy_pb2, policy_pb2_grpc

log = structlog.get_logger(__name__)


def policy_set_info(ps: LoadedPolicySet, last_error: str) -> policy_pb2.PolicySetInfo:
    info = policy_pb2.PolicySetInfo(
        version=ps.version, policy_ids=list(ps.policy_ids), last_error=last_error
    )
    info.load_time.FromDatetime(ps.load_time)
    return info


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(
        self,
        store: PolicyStore,
        audit: AuditWriter,
        *,
        async_audit_queue: int = 0,
        announce_reload: Callable[[LoadedPolicySet], Awaitable[None]] | None = None,
        tests_dir: Path | None = None,
    ) -> None:
        """``async_audit_queue > 0`` defers decision records, at most that many at a time
        (see the module docstring); 0 writes each before answering. ``announce_reload``
        tells the other decision points after a requested reload. ``tests_dir``: the
        policy cases GetPolicySet reports coverage with."""
        self.coverage = CoverageReports(tests_dir or Path("/nonexistent"))
        self.store = store
        self.audit = audit
        self._backlog = async_audit_queue
        self._announce_reload = announce_reload

    # -- deferred decision records --------------------------------------------------------
    async def flush(self, timeout_s: float = 5.0) -> None:
        """Write every deferred decision record (waits at most ``timeout_s``)."""
        with contextlib.suppress(TimeoutError, Unavailable):
            async with asyncio.timeout(timeout_s):
                await self.audit.flush()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is deferred (at most ``timeout_s``), then stop the writer's timer."""
        await self.flush(timeout_s)
        if self.audit.deferred:
            log.error("policy_decisions_unaudited", deferred=self.audit.deferred)
        with contextlib.suppress(Unavailable):
            await self.audit.close()

    def _defer(self, record: dict[str, Any]) -> None:
        if self.audit.failing:
            raise Unavailable(
                "audit trail unavailable: no decision is answered",
                reason="AUDIT_UNAVAILABLE",
                retry_after_s=1.0,
            )
        if self.audit.deferred >= self._backlog:
            raise Unavailable(
                "audit trail behind: no decision is answered",
                reason="AUDIT_UNAVAILABLE",
                retry_after_s=0.1,
            )
        self.audit.defer(audit_pb2.AUDIT_KIND_POLICY_DECISION, **record)

    async def Check(
        self, request: policy_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.CheckResponse:
        ps = self.store.current
        decision_id = str(uuid.uuid4())
        try:
            verdict = evaluate(ps, check_input(request), hour=datetime.now(UTC).hour)
        except RequestInvalid as exc:
            await self._audit_rejected(request, decision_id, exc.violations)
            raise InvalidArgument(
                "policy check cannot be evaluated",
                reason="INVALID_CHECK",
                field_violations=exc.violations,
            ) from None
        except InvalidArgument as exc:
            await self._audit_rejected(request, decision_id, exc.field_violations)
            raise
        # Fail closed: Unavailable propagates, and no decision leaves without its record.
        await self._audit_decision(request, decision_id, verdict, ps.version)
        return check_response(ps, verdict, decision_id)

    async def _audit_decision(
        self,
        request: policy_pb2.CheckRequest,
        decision_id: str,
        verdict: Verdict,
        version: str,
    ) -> None:
        details: dict[str, object] = {
            "principal": f"{request.principal.type}::{request.principal.id}",
            "action": request.action,
            "policy_set_version": version,
            "determining_policies": list(verdict.determining_policies),
        }
        if verdict.errors:
            details["errors"] = list(verdict.errors)
        if verdict.approval_reason:
            details["approval_reason"] = verdict.approval_reason
        record: dict[str, Any] = {
            "workflow_id": request.context.workflow_id,
            "task_id": request.context.task_id,
            "outcome": verdict.decision,
            "resource": request.resource.id,
            "decision_id": decision_id,
            "details": details,
        }
        if self._backlog:
            self._defer(record)
            return
        await self.audit.append(audit_pb2.AUDIT_KIND_POLICY_DECISION, **record)

    async def _audit_rejected(
        self,
        request: policy_pb2.CheckRequest,
        decision_id: str,
        violations: tuple[tuple[str, str], ...],
    ) -> None:
        try:
            await self.audit.append(
                audit_pb2.AUDIT_KIND_REQUEST_REJECTED,
                workflow_id=request.context.workflow_id,
                task_id=request.context.task_id,
                outcome="invalid",
                resource=request.resource.id,
                decision_id=decision_id,
                details={
                    "principal": f"{request.principal.type}::{request.principal.id}",
                    "action": request.action,
                    "violations": [f"{f}: {d}" for f, d in violations],
                },
            )
        except Unavailable:
            # The request is refused either way; the failed write is logged by the writer.
            log.warning("policy_rejection_unaudited", decision_id=decision_id)

    async def ReloadPolicies(
        self, request: policy_pb2.ReloadPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ReloadPoliciesResponse:
        try:
            ps = await self.store.reload()
        except PolicyLoadError as exc:
            raise FailedPrecondition(
                f"policy set refused, still serving {self.store.current.version}: {exc}",
                reason="POLICY_SET_INVALID",
                violations=[("POLICY_INVALID", s, d) for s, d in exc.errors],
                metadata={"serving_version": self.store.current.version},
            ) from None
        if self._announce_reload is not None:
            try:
                await self._announce_reload(ps)
            except Exception as exc:
                # This service reloaded; the others still pick the change up at their poll.
                log.warning("policy_reload_announcement_failed", error=repr(exc))
        return policy_pb2.ReloadPoliciesResponse(policy_set=policy_set_info(ps, ""))

    async def GetPolicySet(
        self, request: policy_pb2.GetPolicySetRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetPolicySetResponse:
        # Who reached it is the callers table's decision (the operator, and people through
        # the front door, whose identity Envoy verified): the set's ids, version and
        # coverage are what anyone governed by it may know; the policy texts stay here.
        info = policy_set_info(self.store.current, self.store.last_error)
        info.MergeFrom(await self.coverage.of(self.store.current))
        return policy_pb2.GetPolicySetResponse(policy_set=info)
