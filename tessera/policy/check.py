"""``tessera.v1.CheckRequest`` → Cedar request → ``CheckResponse``: the one mapping shared by
the policy service's ``Check`` RPC and the tool proxy's embedded decision point, so both
decide the same request the same way."""

from __future__ import annotations

from google.protobuf import json_format

from tessera.policy.engine import CheckInput, LoadedPolicySet, Verdict
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2, policy_pb2

__all__ = ["DECISIONS", "check_input", "check_response"]

DECISIONS = {
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


def check_response(
    ps: LoadedPolicySet, verdict: Verdict, decision_id: str
) -> policy_pb2.CheckResponse:
    """The answer to a Check decided by ``verdict`` on ``ps``."""
    return policy_pb2.CheckResponse(
        decision=DECISIONS[verdict.decision],
        decision_id=decision_id,
        determining_policies=list(verdict.determining_policies),
        errors=list(verdict.errors),
        policy_set_version=ps.version,
        approval_reason=verdict.approval_reason,
    )
