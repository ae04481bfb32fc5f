"""Step 7 of InvokeTool: ask the policy decision point about one call, remote (the policy
service's ``Check``) or embedded (in-process), and note its answer for the audit record."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
import structlog

from services.tool_proxy.budgets import LiveBudgets
from services.tool_proxy.embedded_policy import EmbeddedPolicy
from services.tool_proxy.recording import CallRecord
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tokens import VerifiedToken
from services.tool_proxy.tools.registry import Tool
from services.tool_proxy.wire import to_struct
from tessera.frozen import FrozenAgents
from tessera.policy.engine import CheckInput
from tessera.runtime.errors import PermissionDenied, Unavailable
from tessera.runtime.principal import Principal
from tessera.v1 import common_pb2, policy_pb2, policy_pb2_grpc, tool_proxy_pb2

__all__ = ["PolicyCheck"]

log = structlog.get_logger(__name__)

_POLICY_MARGIN_S = 0.05


def _cents(value: Any) -> int | None:
    """A money amount in major units as integer minor units (cents), rounded UP so that
    rounding never slips a call under a policy threshold; None when not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return math.ceil(Decimal(str(value)) * 100)


def _meta_int(meta: Mapping[str, str], key: str) -> int | None:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _tool_attributes(tool: Tool) -> dict[str, Any]:
    """The ``Tool`` entity's attributes (policy/schema.cedarschema)."""
    spec = tool.spec
    return {
        "name": spec.name,
        "side_effect": spec.side_effect.value,
        "pii": spec.pii,
        "category": spec.category,
    }


def _call_context(
    tool: Tool, arguments: dict[str, Any], approval: str, budget_remaining: int
) -> dict[str, Any]:
    """``ToolCallContext``: the approval, the budget, the hour, and the money amounts
    lifted from the arguments (cents, rounded up)."""
    spec = tool.spec
    attrs: dict[str, Any] = {
        "arguments": arguments,
        "approval": approval,
        "budget_remaining": budget_remaining,
        "hour": datetime.now(UTC).hour,
    }
    optional = {
        "amount": _cents(arguments.get("amount")),
        "price": _cents(arguments.get("price")) if "price" in arguments else spec.price or None,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    return attrs


class PolicyCheck:
    """Exactly one of ``policy`` (remote mode: the policy service's stub) and
    ``embedded_policy`` (embedded mode) decides."""

    def __init__(
        self,
        *,
        settings: ToolProxySettings,
        policy: policy_pb2_grpc.PolicyServiceStub | None,
        embedded_policy: EmbeddedPolicy | None,
        budgets: LiveBudgets | None = None,
        frozen: FrozenAgents | None = None,
    ) -> None:
        if (policy is None) == (embedded_policy is None):
            raise ValueError("give exactly one of policy and embedded_policy")
        self.settings = settings
        self.policy = policy
        self.embedded_policy = embedded_policy
        self.budgets = budgets or LiveBudgets(
            None, default_cents=settings.default_budget_remaining_cents
        )
        self.frozen = frozen

    async def check(
        self,
        request: tool_proxy_pb2.InvokeToolRequest,
        context: grpc.aio.ServicerContext,
        verified: VerifiedToken,
        tool: Tool,
        arguments: dict[str, Any],
        approval: str,
    ) -> policy_pb2.CheckResponse:
        spec = tool.spec
        meta = verified.info.meta
        # Live: what the workflow's budget has left now (the coordinator's ledger).
        attrs = _call_context(
            tool, arguments, approval, await self.budgets.remaining_cents(verified)
        )
        # max_budget only from the coordinator-issued token (the plan's input), never
        # from the agent's request.
        max_budget = _meta_int(meta, "max_budget")
        if max_budget is not None:
            attrs["max_budget"] = max_budget
        # The token's tools; an MCP tool is in scope through its server's scope name.
        tools = sorted(
            verified.tools | {spec.name} if spec.scope in verified.tools else verified.tools
        )
        principal_attrs = {
            "tier": meta.get("tier", "standard"),
            "tools": tools,
            "frozen": self._frozen(verified.agent),
        }
        resource_attrs = _tool_attributes(tool)
        if self.embedded_policy is not None:
            # In-process: the same request, without a protobuf round trip of its values.
            return self.embedded_policy.decide(
                CheckInput(
                    principal_type="Agent",
                    principal_id=verified.agent,
                    action="call_tool",
                    resource_type="Tool",
                    resource_id=spec.name,
                    principal_attrs=principal_attrs,
                    resource_attrs=resource_attrs,
                    context=attrs,
                ),
                tool=spec.name,
            )
        check = policy_pb2.CheckRequest(
            context=common_pb2.RequestContext(
                workflow_id=verified.workflow,
                task_id=verified.task,
                causation_id=request.context.causation_id,
                traceparent=request.context.traceparent,
                principal=verified.agent,
            ),
            principal=common_pb2.Entity(
                type="Agent", id=verified.agent, attributes=to_struct(principal_attrs)
            ),
            action="call_tool",
            resource=common_pb2.Entity(
                type="Tool", id=spec.name, attributes=to_struct(resource_attrs)
            ),
            context_attributes=to_struct(attrs),
        )
        assert self.policy is not None
        remaining = context.time_remaining()
        timeout = self.settings.policy_timeout_s
        if remaining is not None:
            timeout = min(timeout, remaining - _POLICY_MARGIN_S)
        if timeout <= 0:
            raise Unavailable("no time left to ask the policy service", reason="POLICY_UNAVAILABLE")
        try:
            response: policy_pb2.CheckResponse = await self.policy.Check(check, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            log.warning("policy_check_failed", code=err.code().name, tool=spec.name)
            if err.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise PermissionDenied(
                    "the policy service refused to decide this call",
                    reason="POLICY_DENIED",
                    metadata={"policy_error": err.code().name},
                ) from None
            raise Unavailable(
                "policy service unavailable: the call is refused",
                reason="POLICY_UNAVAILABLE",
                retry_after_s=1.0,
            ) from None
        return response

    def check_person(
        self, principal: Principal, tool: Tool, arguments: dict[str, Any], approval: str
    ) -> policy_pb2.CheckResponse:
        """The decision on a person's call over MCP: principal ``User::<name>`` in the
        ``Group``s of their verified token. Decided in-process only (embedded or
        distributed mode): the policy service's ``Check`` carries no groups, so in
        remote mode every person's call is refused (UNAVAILABLE)."""
        if self.embedded_policy is None:
            raise Unavailable(
                "people's tool calls are decided in-process: the proxy runs in remote policy mode",
                reason="POLICY_MODE_UNSUPPORTED",
            )
        spec = tool.spec
        context = _call_context(
            tool, arguments, approval, self.settings.default_budget_remaining_cents
        )
        return self.embedded_policy.decide(
            CheckInput(
                principal_type="User",
                principal_id=principal.id,
                principal_attrs={"name": principal.id},
                principal_groups=tuple(sorted(principal.groups)),
                action="call_tool",
                resource_type="Tool",
                resource_id=spec.name,
                resource_attrs=_tool_attributes(tool),
                context=context,
            ),
            tool=spec.name,
        )

    def _frozen(self, agent: str) -> bool:
        if self.frozen is None:
            return False
        if not self.frozen.ready:  # fail closed: a freeze may be in force
            raise Unavailable(
                "the frozen agents are not known yet: the call is refused",
                reason="FROZEN_UNKNOWN",
                retry_after_s=1.0,
            )
        return self.frozen.is_frozen(agent)

    def note(self, call: CallRecord, decision: policy_pb2.CheckResponse) -> None:
        """Put the decision into the call's audit record."""
        call.decision_id = decision.decision_id
        call.details["decision"] = policy_pb2.Decision.Name(decision.decision)
        call.details["policies"] = list(decision.determining_policies)
        if decision.policy_set_version:
            call.details["policy_set_version"] = decision.policy_set_version
        if self.embedded_policy is not None:
            # No policy service record of this decision exists: this record is the one.
            call.details["policy_mode"] = "embedded"
            if decision.errors:
                call.details["policy_errors"] = list(decision.errors)
            if decision.approval_reason:
                call.details["approval_reason"] = decision.approval_reason

    @staticmethod
    def denied(decision: policy_pb2.CheckResponse) -> PermissionDenied:
        return PermissionDenied(
            "denied by policy",
            reason="POLICY_DENIED",
            metadata={
                "decision_id": decision.decision_id,
                "policies": ",".join(decision.determining_policies),
            },
        )
