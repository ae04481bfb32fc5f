"""PolicyService RPCs: Check, ReloadPolicies, GetPolicySet.

Check fails closed: only an explicit Cedar Allow allows, and no decision is answered
before its audit record is acknowledged (UNAVAILABLE otherwise).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import structlog
from google.protobuf import json_format

from services.policy.store import PolicyStore
from tessera.audit import AuditWriter
from tessera.policy.engine import (
    CheckInput,
    LoadedPolicySet,
    PolicyLoadError,
    RequestInvalid,
    Verdict,
    evaluate,
)
from tessera.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from tessera.v1 import audit_pb2, common_pb2, policy_pb2, policy_pb2_grpc

log = structlog.get_logger(__name__)

_DECISIONS = {
    "allow": policy_pb2.DECISION_ALLOW,
    "deny": policy_pb2.DECISION_DENY,
    "approval_required": policy_pb2.DECISION_APPROVAL_REQUIRED,
}


def _attrs(entity: common_pb2.Entity) -> dict[str, object]:
    return json_format.MessageToDict(entity.attributes) if entity.HasField("attributes") else {}


def check_input(request: policy_pb2.CheckRequest) -> CheckInput:
    """The request as engine input; missing parts become INVALID_ARGUMENT."""
    violations: list[tuple[str, str]] = []
    if not request.HasField("principal"):
        violations.append(("principal", "required"))
    if not request.action:
        violations.append(("action", "required"))
    if not request.HasField("resource"):
        violations.append(("resource", "required"))
    if violations:
        raise InvalidArgument(
            "malformed policy check", reason="INVALID_CHECK", field_violations=violations
        )
    context = (
        json_format.MessageToDict(request.context_attributes)
        if request.HasField("context_attributes")
        else {}
    )
    return CheckInput(
        principal_type=request.principal.type,
        principal_id=request.principal.id,
        action=request.action,
        resource_type=request.resource.type,
        resource_id=request.resource.id,
        principal_attrs=_attrs(request.principal),
        resource_attrs=_attrs(request.resource),
        context=context,
    )


def policy_set_info(ps: LoadedPolicySet, last_error: str) -> policy_pb2.PolicySetInfo:
    info = policy_pb2.PolicySetInfo(
        version=ps.version, policy_ids=list(ps.policy_ids), last_error=last_error
    )
    info.load_time.FromDatetime(ps.load_time)
    return info


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, store: PolicyStore, audit: AuditWriter) -> None:
        self.store = store
        self.audit = audit

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
        return policy_pb2.CheckResponse(
            decision=_DECISIONS[verdict.decision],
            decision_id=decision_id,
            determining_policies=list(verdict.determining_policies),
            errors=list(verdict.errors),
            policy_set_version=ps.version,
            approval_reason=verdict.approval_reason,
        )

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
        await self.audit.append(
            audit_pb2.AUDIT_KIND_POLICY_DECISION,
            workflow_id=request.context.workflow_id,
            task_id=request.context.task_id,
            outcome=verdict.decision,
            resource=request.resource.id,
            decision_id=decision_id,
            details=details,
        )

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
        return policy_pb2.ReloadPoliciesResponse(policy_set=policy_set_info(ps, ""))

    async def GetPolicySet(
        self, request: policy_pb2.GetPolicySetRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetPolicySetResponse:
        return policy_pb2.GetPolicySetResponse(
            policy_set=policy_set_info(self.store.current, self.store.last_error)
        )
