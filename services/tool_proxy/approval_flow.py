"""Who says a call may run: the policy's answer and, when it asks for a human, the
approval flow (README.md, "Approval contract").

InvokeTool's step 7 is :meth:`ApprovalFlow.authorize`: an ALLOW runs; an
APPROVAL_REQUIRED opens (or finds) the approval record and refuses with
FAILED_PRECONDITION ``APPROVAL_REQUIRED`` carrying a typed ``tessera.v1.ApprovalRequired``
detail until a human decided; once approved for these very arguments, the policy is
asked again with ``approval = "approved"``. :meth:`ApprovalFlow.decide` serves
``DecideApproval``: the coordinator hands the human decision over, and the proxy (the one
owner of approvals) stores it before the coordinator re-dispatches the task.

A person's call over MCP goes the same way (:meth:`ApprovalFlow.authorize_person`): its
approval is decided by another person through ``McpService.DecideToolCallApproval``
(:meth:`ApprovalFlow.decide_person`), authorized by Cedar (four eyes).
"""

from __future__ import annotations

import re
from typing import Any

import grpc
import structlog
from google.protobuf import struct_pb2

from services.tool_proxy.approvals import (
    APPROVED,
    PENDING,
    PEOPLE,
    REJECTED,
    ApprovalStore,
    gate_id,
    person_gate_id,
)
from services.tool_proxy.policy_check import PolicyCheck
from services.tool_proxy.recording import CallRecord, Recorder, approver_arguments
from services.tool_proxy.tokens import VerifiedToken
from services.tool_proxy.tools.registry import Tool
from services.tool_proxy.wire import Malformed
from tessera.policy.control_plane import ControlPlaneAuthorization
from tessera.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from tessera.runtime.grpc_authz import peer
from tessera.runtime.principal import Principal
from tessera.v1 import mcp_pb2, policy_pb2, tool_proxy_pb2

__all__ = ["ApprovalFlow"]

log = structlog.get_logger(__name__)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MAX_DECIDED_BY = 256
APPROVAL_COLLECTION = "toolCallApprovals"
"""Resource names of people's approvals: ``toolCallApprovals/{gate}``."""
_DECISIONS = {
    tool_proxy_pb2.APPROVAL_DECISION_APPROVE: APPROVED,
    tool_proxy_pb2.APPROVAL_DECISION_REJECT: REJECTED,
}
_STATES = {
    PENDING: tool_proxy_pb2.APPROVAL_STATE_PENDING,
    APPROVED: tool_proxy_pb2.APPROVAL_STATE_APPROVED,
    REJECTED: tool_proxy_pb2.APPROVAL_STATE_REJECTED,
}


class ApprovalFlow:
    def __init__(self, *, store: ApprovalStore, policy: PolicyCheck, recorder: Recorder) -> None:
        self.store = store
        self.policy = policy
        self.recorder = recorder

    # -- InvokeTool, step 7 -----------------------------------------------------------
    async def authorize(
        self,
        request: tool_proxy_pb2.InvokeToolRequest,
        context: grpc.aio.ServicerContext,
        verified: VerifiedToken,
        tool: Tool,
        arguments: dict[str, Any],
        digest: str,
        call: CallRecord,
    ) -> policy_pb2.CheckResponse:
        """The ALLOW decision the call runs under; raises every refusal."""
        spec = tool.spec
        decision = await self.policy.check(request, context, verified, tool, arguments, "none")
        self.policy.note(call, decision)
        if decision.decision == policy_pb2.DECISION_ALLOW:
            return decision
        if decision.decision != policy_pb2.DECISION_APPROVAL_REQUIRED:
            raise self.policy.denied(decision)

        wf, gate = verified.workflow, gate_id(verified.task, spec.name, request.idempotency_key)
        call.details["gate"] = gate
        record = await self.store.get(wf, gate)
        reason = decision.approval_reason or f"{spec.name} requires approval"
        if record is None:
            record = await self.store.request(
                wf,
                gate,
                tool=spec.name,
                task_id=verified.task,
                reason=reason,
                arguments_digest=digest,
            )
        if record.get("state") == PENDING:
            raise FailedPrecondition(
                f"{spec.name!r} needs a human approval (gate {gate})",
                reason="APPROVAL_REQUIRED",
                metadata={"gate": gate, "reason": reason},
                violations=[("APPROVAL", f"workflows/{wf}/gates/{gate}", reason)],
                extra_details=[_approval_required(gate, tool, reason, arguments, decision)],
            )
        _require_approved(record, digest, gate)
        approved = await self.policy.check(request, context, verified, tool, arguments, "approved")
        self.policy.note(call, approved)
        call.details["approval"] = "approved"
        if approved.decision != policy_pb2.DECISION_ALLOW:
            raise self.policy.denied(approved)
        return approved

    # -- a person's call over MCP ------------------------------------------------------
    async def authorize_person(
        self,
        principal: Principal,
        tool: Tool,
        arguments: dict[str, Any],
        digest: str,
        key: str,
        call: CallRecord,
    ) -> policy_pb2.CheckResponse:
        """As :meth:`authorize`, for a person: the approval record is
        ``people.<person_gate_id>`` with ``requested_by``, and its pending refusal
        names ``toolCallApprovals/<gate>`` (decided with :meth:`decide_person`)."""
        spec = tool.spec
        decision = self.policy.check_person(principal, tool, arguments, "none")
        self.policy.note(call, decision)
        if decision.decision == policy_pb2.DECISION_ALLOW:
            return decision
        if decision.decision != policy_pb2.DECISION_APPROVAL_REQUIRED:
            raise self.policy.denied(decision)
        gate = person_gate_id(principal.id, spec.name, key)
        name = f"{APPROVAL_COLLECTION}/{gate}"
        call.details["gate"] = gate
        reason = decision.approval_reason or f"{spec.name} requires approval"
        record = await self.store.get(PEOPLE, gate)
        if record is None:
            record = await self.store.request(
                PEOPLE,
                gate,
                tool=spec.name,
                task_id=call.task_id,
                reason=reason,
                arguments_digest=digest,
                extra={
                    "requested_by": principal.id,
                    "side_effect": spec.side_effect.value,
                    "category": spec.category,
                },
            )
        if record.get("state") == PENDING:
            raise FailedPrecondition(
                f"{spec.name!r} needs another person's approval: {name}",
                reason="APPROVAL_REQUIRED",
                metadata={"approval": name, "reason": reason},
                violations=[("APPROVAL", name, reason)],
                extra_details=[_approval_required(gate, tool, reason, arguments, decision)],
            )
        _require_approved(record, digest, gate)
        approved = self.policy.check_person(principal, tool, arguments, "approved")
        self.policy.note(call, approved)
        call.details["approval"] = "approved"
        call.details["approved_by"] = str(record.get("decided_by", ""))
        if approved.decision != policy_pb2.DECISION_ALLOW:
            raise self.policy.denied(approved)
        return approved

    async def decide_person(
        self,
        request: mcp_pb2.DecideToolCallApprovalRequest | Malformed,
        principal: Principal,
        authorization: ControlPlaneAuthorization,
    ) -> mcp_pb2.DecideToolCallApprovalResponse:
        """A person's decision on another person's call: ``principal``, the verified
        person (``authorization.principal``), decided by
        the ``decide_tool_call`` policies (four eyes: never the requester), stored as
        :meth:`decide` stores the coordinator's, audited."""
        if isinstance(request, Malformed):
            raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
        collection, _, gate = request.name.partition("/")
        violations = []
        if collection != APPROVAL_COLLECTION or not _ID_RE.fullmatch(gate):
            violations.append(("name", f"{APPROVAL_COLLECTION}/{{approval}}"))
        state = _DECISIONS.get(request.decision)
        if state is None:
            violations.append(("decision", "APPROVAL_DECISION_APPROVE or _REJECT"))
        if violations or state is None:
            raise InvalidArgument("invalid approval decision", field_violations=violations)
        record = await self.store.get(PEOPLE, gate)
        if record is None:
            raise NotFound(f"no approval {request.name}", reason="APPROVAL_NOT_FOUND")
        await authorization.require(
            principal,
            "decide_tool_call",
            "ToolCallApproval",
            gate,
            {
                "tool": str(record.get("tool", "")),
                "requested_by": str(record.get("requested_by", "")),
                "side_effect": str(record.get("side_effect", "")),
                "category": str(record.get("category", "")),
            },
            context={"approve": state == APPROVED},
            resource_name=request.name,
        )
        decided = await self.store.decide(PEOPLE, gate, state=state, decided_by=principal.name)
        if not decided.repeated:
            caller = peer()
            await self.recorder.record_decision(
                workflow_id=PEOPLE,
                gate=gate,
                record=decided.record,
                caller=caller.spiffe_id if caller is not None else "",
            )
            log.info("person_approval_decided", gate=gate, state=state, by=principal.name)
        stored = decided.record
        return mcp_pb2.DecideToolCallApprovalResponse(
            approval=mcp_pb2.ToolCallApproval(
                name=request.name,
                tool=str(stored.get("tool", "")),
                requested_by=str(stored.get("requested_by", "")),
                reason=str(stored.get("reason", "")),
                state=_STATES.get(
                    str(stored.get("state")), tool_proxy_pb2.APPROVAL_STATE_UNSPECIFIED
                ),
                decided_by=str(stored.get("decided_by", "")),
            )
        )

    # -- DecideApproval ---------------------------------------------------------------
    async def decide(
        self, request: tool_proxy_pb2.DecideApprovalRequest | Malformed
    ) -> tool_proxy_pb2.DecideApprovalResponse:
        """Store a human decision (idempotent), audit it, answer the stored approval."""
        if isinstance(request, Malformed):
            raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
        violations = []
        if not _ID_RE.fullmatch(request.workflow_id):
            violations.append(("workflow_id", "1-128 chars of [A-Za-z0-9_-]"))
        if not _ID_RE.fullmatch(request.gate_id):
            violations.append(("gate_id", "1-128 chars of [A-Za-z0-9_-]"))
        state = _DECISIONS.get(request.decision)
        if state is None:
            violations.append(("decision", "APPROVAL_DECISION_APPROVE or _REJECT"))
        if not request.decided_by or len(request.decided_by) > _MAX_DECIDED_BY:
            violations.append(("decided_by", f"required, at most {_MAX_DECIDED_BY} chars"))
        if violations or state is None:
            raise InvalidArgument("invalid approval decision", field_violations=violations)
        wf, gate = request.workflow_id, request.gate_id
        decided = await self.store.decide(wf, gate, state=state, decided_by=request.decided_by)
        if not decided.repeated:
            caller = peer()
            await self.recorder.record_decision(
                workflow_id=wf,
                gate=gate,
                record=decided.record,
                caller=caller.spiffe_id if caller is not None else "",
            )
            log.info("approval_decided", workflow_id=wf, gate=gate, state=state)
        record = decided.record
        return tool_proxy_pb2.DecideApprovalResponse(
            approval=tool_proxy_pb2.Approval(
                workflow_id=wf,
                gate_id=gate,
                task_id=str(record.get("task_id", "")),
                tool=str(record.get("tool", "")),
                reason=str(record.get("reason", "")),
                state=_STATES.get(
                    str(record.get("state")), tool_proxy_pb2.APPROVAL_STATE_UNSPECIFIED
                ),
                decided_by=str(record.get("decided_by", "")),
            )
        )


def _approval_required(
    gate: str,
    tool: Tool,
    reason: str,
    arguments: dict[str, Any],
    decision: policy_pb2.CheckResponse,
) -> tool_proxy_pb2.ApprovalRequired:
    """The typed detail of an ``APPROVAL_REQUIRED`` refusal (what the approver sees)."""
    return tool_proxy_pb2.ApprovalRequired(
        gate_id=gate,
        tool=tool.spec.name,
        reason=reason,
        arguments=_struct(approver_arguments(arguments, tool)),
        policy_ids=decision.determining_policies,
    )


def _require_approved(record: dict[str, Any], digest: str, gate: str) -> None:
    """A decided record lets this call run only if approved for these very arguments."""
    state = record.get("state")
    if state == APPROVED and record.get("arguments_digest") != digest:
        # Approved for other arguments: this call needs its own approval.
        raise PermissionDenied(
            "the approval was given for other arguments",
            reason="APPROVAL_ARGUMENTS_CHANGED",
            metadata={"gate": gate},
        )
    if state == REJECTED:
        raise PermissionDenied(
            "the approval was rejected", reason="APPROVAL_REJECTED", metadata={"gate": gate}
        )
    if state != APPROVED:
        raise PermissionDenied(
            "the approval record is unreadable",
            reason="APPROVAL_STATE_INVALID",
            metadata={"gate": gate},
        )
