"""Who may do what on the control plane: the decision point of a service for its own
actions (the coordinator: start, read, cancel, decide; the registry: freeze and unfreeze
agents), evaluated in-process with the policy set of ``policy/`` (the same engine and
set as the tool proxy's).

The principal is the verified caller (:func:`tessera.runtime.principal.principal_of`): a
person the front door authenticated, with their groups, or a workload in its own name.
Every decision, allowed or refused, is an audit record naming the principal; a refusal is
PERMISSION_DENIED with ErrorInfo (reason ``ACTION_NOT_ALLOWED``, the action, the resource
and the forbids that matched).

On a plaintext debug server nothing is authenticated, so nothing is authorized here
either (as with caller checks): decisions are recorded in the name the request gives.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import structlog

from tessera.policy.distribution import PolicySource
from tessera.policy.engine import CheckInput, RequestInvalid, evaluate
from tessera.runtime.errors import PermissionDenied, Unauthenticated
from tessera.runtime.grpc_authz import peer
from tessera.runtime.principal import Principal, principal_of
from tessera.v1 import audit_pb2

if TYPE_CHECKING:
    from tessera.audit import AuditWriter

__all__ = ["ChainAuditor", "ControlPlaneAuthorization", "Decision"]

log = structlog.get_logger(__name__)
AK = audit_pb2.AuditKind


@dataclass(frozen=True)
class Decision:
    allowed: bool
    quorum: int
    policies: tuple[str, ...]
    errors: tuple[str, ...]
    policy_version: str


class _Auditor(Protocol):
    async def record(self, kind: Any, **fields: Any) -> None: ...


class ChainAuditor:
    """Decision records on a service's own audit chain (a ``tessera.audit.AuditWriter``),
    each stored before the action goes on (a record that cannot be written refuses the
    action: UNAVAILABLE)."""

    def __init__(self, audit: AuditWriter) -> None:
        self._audit = audit

    async def record(self, kind: Any, **fields: Any) -> None:
        await self._audit.append(kind, **fields)


class ControlPlaneAuthorization:
    """``store`` None: a plaintext debug server (no authorization)."""

    def __init__(
        self,
        store: PolicySource | None,
        auditor: _Auditor | None,
        *,
        subject_claim: str = "preferred_username",
        groups_claim: str = "groups",
    ) -> None:
        self.store = store
        self._auditor = auditor
        self._subject_claim = subject_claim
        self._groups_claim = groups_claim

    @property
    def enforcing(self) -> bool:
        return self.store is not None

    async def principal(self, context: grpc.aio.ServicerContext, method: str) -> Principal:
        """The verified principal; a caller that may not speak for the person it names
        (or Envoy without claims) is refused and audited."""
        try:
            return principal_of(
                context, subject_claim=self._subject_claim, groups_claim=self._groups_claim
            )
        except (PermissionDenied, Unauthenticated) as exc:
            caller = peer()
            if self._auditor is not None:
                await self._auditor.record(
                    AK.AUDIT_KIND_REQUEST_REJECTED,
                    outcome=exc.reason,
                    resource=method,
                    details={"caller": caller.spiffe_id if caller else "", "reason": exc.reason},
                )
            raise

    def decide(
        self,
        principal: Principal,
        action: str,
        resource_type: str,
        resource_id: str,
        attributes: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Evaluate without auditing or raising (always allowed when not enforcing)."""
        if self.store is None:
            return Decision(True, 1, (), (), "")
        kind = "User" if principal.kind == "user" else "Workload"
        request = CheckInput(
            principal_type=kind,
            principal_id=principal.id,
            principal_attrs={"name": principal.id},
            principal_groups=tuple(sorted(principal.groups)) if kind == "User" else (),
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            resource_attrs=dict(attributes),
            context=dict(context or {}),
        )
        policy_set = self.store.current
        try:
            verdict = evaluate(policy_set, request, hour=time.gmtime().tm_hour)
        except RequestInvalid as exc:  # our own request: a schema/policy mismatch
            log.error("control_plane_request_invalid", action=action, violations=exc.violations)
            errors = tuple(d for _, d in exc.violations)
            return Decision(False, 1, (), errors, policy_set.version)
        return Decision(
            verdict.decision == "allow",
            verdict.quorum,
            verdict.determining_policies,
            verdict.errors,
            policy_set.version,
        )

    async def require(
        self,
        principal: Principal,
        action: str,
        resource_type: str,
        resource_id: str,
        attributes: Mapping[str, Any],
        *,
        context: Mapping[str, Any] | None = None,
        workflow_id: str = "",
        resource_name: str = "",
        audit_allowed: bool = True,
    ) -> int:
        """Allow ``action`` or raise PermissionDenied; audit the decision (an allowed read
        is not audited, ``audit_allowed=False``: reads change nothing and come by the
        thousand; a refused one always is). Returns the quorum the allowing policies ask
        for (1 when none, and always 1 when not enforcing)."""
        if self.store is None:
            return 1
        decision = self.decide(principal, action, resource_type, resource_id, attributes, context)
        if self._auditor is not None and (audit_allowed or not decision.allowed):
            await self._auditor.record(
                AK.AUDIT_KIND_POLICY_DECISION,
                workflow_id=workflow_id,
                outcome="allow" if decision.allowed else "deny",
                resource=resource_name or f"{resource_type}/{resource_id}",
                details={
                    "principal": principal.name,
                    "principal_kind": principal.kind,
                    "action": action,
                    "policies": list(decision.policies),
                    "policy_version": decision.policy_version,
                },
            )
        if decision.allowed:
            return decision.quorum
        policies, errors = decision.policies, decision.errors
        log.warning(
            "control_plane_action_refused",
            principal=principal.name,
            action=action,
            resource=resource_name,
            policies=list(policies),
        )
        raise PermissionDenied(
            f"{principal.name} may not {action.replace('_', ' ')} {resource_name}".rstrip(),
            reason="ACTION_NOT_ALLOWED",
            metadata={
                "principal": principal.name,
                "action": action,
                "resource": resource_name,
                "policies": ",".join(policies),
                **({"errors": "; ".join(errors)[:500]} if errors else {}),
            },
        )
