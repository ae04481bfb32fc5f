"""ToolProxyService RPCs: the governed path from an agent to a tool.

InvokeTool, in order, failing closed at every step (README.md has the full contract):
token format → token lookup (≤ 1 s cache) → token meta matches the call → tool exists and
is in the token's scope → arguments (size, schema, hostile input, idempotency key) → rate
limits → policy Check, remote or embedded (→ approval flow) → idempotency claim (a
claim taken over from a dead executor asks the tool first) → use budget, settling while
the tool secret is read with the caller's token and the ``allow`` record is written (both
must succeed) → backend under a deadline, then its outcome recorded, both run to their
end even if the caller goes away → audit outcome.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from services.tool_proxy.approvals import APPROVED, PENDING, REJECTED, ApprovalStore, gate_id
from services.tool_proxy.embedded_policy import EmbeddedPolicy
from services.tool_proxy.execution import Detached, Execution, canonical, execute
from services.tool_proxy.idempotency import IdempotencyStore, Replay, effect_id
from services.tool_proxy.limits import RateLimiter
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tokens import (
    TOKEN_METADATA,
    TokenChecker,
    UseLedger,
    VerifiedToken,
    check_format,
)
from services.tool_proxy.tools.registry import CallInfo, Tool, ToolRegistry
from tessera.jsonschema import Limits, validate
from tessera.policy.engine import CheckInput
from tessera.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TesseraError,
    Unauthenticated,
    Unavailable,
)
from tessera.runtime.grpc_authz import peer
from tessera.v1 import (
    audit_pb2,
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    tool_proxy_pb2,
    tool_proxy_pb2_grpc,
)
from tessera.vault.errors import (
    InvalidToken,
    ToolSecretNotFound,
    VaultPermissionDenied,
    VaultUnavailable,
)
from tessera.vault.tokens import ToolSecret

__all__ = ["AuditSink", "Malformed", "SecretReader", "ToolProxyServicer", "safe_deserializer"]

log = structlog.get_logger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_SECRETISH = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|credential|ssn|card|iban|account_number|"
    r"cvv|pin|authorization|private)",
    re.IGNORECASE,
)
_MAX_PAGE = 500
_MAX_PENDING_AUDITS = 256
_POLICY_MARGIN_S = 0.05
_CALL_MARGIN_S = 0.02
_LEASE_MARGIN_S = 1.0


class AuditSink(Protocol):
    """What the proxy needs of ``tessera.audit.AuditWriter``."""

    async def append(
        self,
        kind: Any,
        *,
        workflow_id: str,
        task_id: str,
        outcome: str,
        resource: str,
        decision_id: str,
        details: dict[str, Any],
    ) -> Any: ...

    def defer(
        self,
        kind: Any,
        *,
        workflow_id: str,
        task_id: str,
        outcome: str,
        resource: str,
        decision_id: str,
        details: dict[str, Any],
    ) -> None: ...

    @property
    def deferred(self) -> int: ...

    async def flush(self) -> None: ...

    def receipt(self, record: Any) -> audit_pb2.AuditReceipt: ...


class SecretReader(Protocol):
    async def read_tool_secret(self, tool: str, *, token: str) -> ToolSecret: ...


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request whose bytes did not decode (answered INVALID_ARGUMENT)."""

    error: str


def safe_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises (grpcio would answer INTERNAL)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return Malformed(type(exc).__name__)

    return parse


@dataclass(slots=True)
class _Call:
    """What the audit record of one InvokeTool says (never a token or a secret)."""

    started: float
    tool: str = ""
    workflow_id: str = ""
    task_id: str = ""
    claimed_principal: str = ""
    agent: str = ""
    decision_id: str = ""
    receipt: audit_pb2.AuditReceipt | None = None
    """Where the awaited record of the decision is stored (the response's receipt)."""
    details: dict[str, Any] = field(default_factory=dict)


def _outcome(exc: TesseraError) -> str:
    if exc.reason == "APPROVAL_REQUIRED":
        return "approval_required"
    code = exc.code
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "denied"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "unavailable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline_exceeded"
    return "refused"


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


class ToolProxyServicer(tool_proxy_pb2_grpc.ToolProxyServiceServicer):
    def __init__(
        self,
        *,
        settings: ToolProxySettings,
        registry: ToolRegistry,
        tokens: TokenChecker,
        ledger: UseLedger,
        vault: SecretReader,
        policy: policy_pb2_grpc.PolicyServiceStub | None,
        limiter: RateLimiter,
        idempotency: IdempotencyStore,
        approvals: ApprovalStore,
        audit: AuditSink,
        digest: Callable[[str], str],
        embedded_policy: EmbeddedPolicy | None = None,
    ) -> None:
        """Exactly one of ``policy`` (remote mode: the policy service's stub) and
        ``embedded_policy`` (embedded mode) decides."""
        if (policy is None) == (embedded_policy is None):
            raise ValueError("give exactly one of policy and embedded_policy")
        self.settings = settings
        self.registry = registry
        self.tokens = tokens
        self.ledger = ledger
        self.vault = vault
        self.policy = policy
        self.embedded_policy = embedded_policy
        self.limiter = limiter
        self.idempotency = idempotency
        self.approvals = approvals
        self.audit = audit
        self.digest = digest
        self._limits = Limits(
            max_depth=settings.max_argument_depth, max_string_length=settings.max_string_length
        )
        self._secrets: dict[str, tuple[ToolSecret, float]] = {}
        self._detached = Detached()
        """Work that outlives its caller: uses being given back, effects being run."""

    # -- InvokeTool -------------------------------------------------------------------
    async def InvokeTool(
        self,
        request: tool_proxy_pb2.InvokeToolRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> tool_proxy_pb2.InvokeToolResponse:
        call = _Call(started=time.monotonic())
        try:
            response = await self._invoke(request, context, call)
        except TesseraError as exc:
            call.details.update(code=exc.code.name, reason=exc.reason)
            await self._record(call, _outcome(exc))
            raise
        return response

    async def _invoke(
        self,
        request: tool_proxy_pb2.InvokeToolRequest | Malformed,
        context: grpc.aio.ServicerContext,
        call: _Call,
    ) -> tool_proxy_pb2.InvokeToolResponse:
        # 0. The request decoded at all (before anything else: nothing below is trusted).
        if isinstance(request, Malformed):
            raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
        call.tool = request.tool[:200]
        call.workflow_id = request.context.workflow_id[:128]
        call.task_id = request.context.task_id[:128]
        call.claimed_principal = request.context.principal[:128]

        # 1. Token present and well-formed (no Vault call for garbage).
        token = check_format(_metadata_value(context, TOKEN_METADATA))

        # 2. Vault vouches for it (cached ≤ 1 s, revocation events evict).
        verified = await self.tokens.verify(token)
        call.agent = verified.agent

        # 3. Its metadata names this very call; the principal comes from it.
        self._check_scope(request, verified)
        # 3b. It was issued to the agent calling: a token that leaked to another workload
        #     (or was copied out of a task) is useless there.
        _check_caller_holds_token(verified)

        # 4. The tool exists and the token was scoped to it.
        tool = self.registry.get(request.tool)
        if tool is None:
            raise NotFound(f"no tool named {call.tool!r}", reason="TOOL_NOT_FOUND")
        spec = tool.spec
        call.details.update(side_effect=spec.side_effect.value, backend=spec.backend.value)
        if spec.scope not in verified.tools:
            raise PermissionDenied(
                f"the task token is not scoped to {spec.name!r}",
                reason="TOOL_NOT_IN_SCOPE",
                metadata={"tool": spec.name},
            )

        # 5. Arguments: size, schema and hostile input; idempotency key where needed.
        arguments = self._arguments(request, tool)
        digest = hashlib.sha256(canonical(arguments)).hexdigest()
        call.details.update(
            arguments=self._audit_arguments(arguments, tool), arguments_digest=digest
        )
        key = request.idempotency_key
        if key and not _IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                "invalid idempotency key",
                field_violations=[("idempotency_key", "1-128 chars of [A-Za-z0-9._:@/+=-]")],
            )
        if spec.side_effect.needs_idempotency_key and not key:
            raise InvalidArgument(
                f"{spec.name!r} has side effects: an idempotency key is required",
                reason="IDEMPOTENCY_KEY_REQUIRED",
                field_violations=[("idempotency_key", "required for side-effecting tools")],
            )

        # 6. Rate limits.
        self.limiter.acquire(agent=verified.agent, tool=spec.name)

        # 7. Policy (and the approval flow). One call of the token's budget is reserved in
        # the ledger meanwhile (independent I/O); it is given back unless the call goes on
        # to step 9, and its errors surface only there, so the order of refusals is kept.
        spend = self.ledger.reserve(verified)
        eid = effect_id(verified.workflow, spec.name, key) if key else ""
        claim = None
        try:
            if self.embedded_policy is not None and not spend.done():
                # Let the reservation's request leave before the (CPU-bound) in-process
                # decision, so the two still overlap.
                await asyncio.sleep(0)
            decision = await self._authorize(
                request, context, verified, tool, arguments, digest, call
            )
            info = CallInfo(
                workflow_id=verified.workflow,
                task_id=verified.task,
                agent=verified.agent,
                decision_id=decision.decision_id,
                idempotency_key=key,
                effect_id=eid or effect_id(verified.workflow, spec.name, digest),
            )

            # 8. Idempotency: replay a completed effect, refuse a concurrent duplicate;
            # a claim whose executor died is taken over only if the tool says its effect
            # did not happen (replayed if it did, refused if the tool cannot tell).
            if spec.side_effect.needs_idempotency_key:
                call.details["effect_id"] = eid
                timeout = self._backend_timeout(context, tool)
                began = await self.idempotency.begin(
                    eid,
                    tool=spec.name,
                    arguments_digest=digest,
                    decision_id=decision.decision_id,
                    # Held as long as this call may run the backend (step 10's deadline
                    # is no later): if this replica dies, a retry takes over soon after.
                    lease_s=timeout + _LEASE_MARGIN_S,
                    lookup=functools.partial(tool.lookup, info) if tool.lookup else None,
                    lookup_timeout_s=timeout,
                )
                if isinstance(began, Replay):
                    await self._give_back(spend, verified)
                    call.details["replayed"] = True
                    if began.recovered:
                        call.details["recovered_from"] = "backend_lookup"
                    await self._record(call, "replayed")
                    return tool_proxy_pb2.InvokeToolResponse(
                        result=_struct(began.result),
                        decision_id=decision.decision_id,
                        replayed=True,
                        receipt=call.receipt,
                    )
                claim = began
        except BaseException:
            await self._give_back(spend, verified)
            raise

        executed = False
        try:
            # 9. Read the secret with the caller's token and (11a) write the awaited
            # ``allow`` record while the reservation of step 7 settles: both are round
            # trips, so overlapping them takes one off the critical path.
            allowed = asyncio.ensure_future(self._secret_then_allow(call, tool, token, verified))
            try:
                uses_left = await spend
            except BaseException:
                # No use could be spent: the call does not run. If the allow record was
                # written, the refusal record InvokeTool writes next (same decision id)
                # says so.
                await _settle(allowed)
                raise
            try:
                secret = await allowed
            except BaseException:
                await self._give_back(spend, verified)  # spent: give it back
                raise
            call.details["uses_left"] = uses_left

            # 10. The backend under the call's deadline, then its outcome recorded: once
            # started, both run to their end even if the caller goes away.
            run = Execution(
                tool=tool,
                arguments=arguments,
                secret=secret,
                info=info,
                claim=claim,
                arguments_digest=digest,
                timeout_s=self._backend_timeout(context, tool),
            )
            executed = True
            result = await self._detached.run(self._execute(run, call))
        finally:
            if claim is not None and not executed:
                await self.idempotency.release(claim)
        return tool_proxy_pb2.InvokeToolResponse(
            result=_struct(result), decision_id=decision.decision_id, receipt=call.receipt
        )

    async def _execute(self, run: Execution, call: _Call) -> dict[str, Any]:
        result = await execute(
            run, store=self.idempotency, max_result_bytes=self.settings.max_result_bytes
        )
        # 11b. The outcome (deferred, with back-pressure).
        await self._record_executed(call)
        return result

    def _check_scope(
        self, request: tool_proxy_pb2.InvokeToolRequest, verified: VerifiedToken
    ) -> None:
        ctx = request.context
        if not verified.agent or not verified.workflow or not verified.task:
            raise PermissionDenied(
                "the task token carries no workflow/task/agent", reason="TOKEN_SCOPE_MISMATCH"
            )
        mismatched = [
            name
            for name, claimed, actual in (
                ("context.workflow_id", ctx.workflow_id, verified.workflow),
                ("context.task_id", ctx.task_id, verified.task),
            )
            if claimed != actual
        ]
        if mismatched:
            raise PermissionDenied(
                "the task token was issued for another workflow or task",
                reason="TOKEN_SCOPE_MISMATCH",
                metadata={"fields": ",".join(mismatched)},
            )

    def _arguments(self, request: tool_proxy_pb2.InvokeToolRequest, tool: Tool) -> dict[str, Any]:
        size = request.arguments.ByteSize()
        if size > self.settings.max_argument_bytes:
            raise ResourceExhausted(
                f"arguments are {size} bytes; the limit is {self.settings.max_argument_bytes}",
                reason="ARGUMENTS_TOO_LARGE",
            )
        try:
            arguments: dict[str, Any] = json_format.MessageToDict(request.arguments)
        except (ValueError, RecursionError, json_format.Error) as exc:
            raise InvalidArgument(
                "arguments are not valid JSON values",
                reason="ARGUMENTS_INVALID",
                field_violations=[("arguments", type(exc).__name__)],
            ) from None
        violations = validate(
            arguments, tool.spec.input_schema, path="arguments", limits=self._limits
        )
        if violations:
            raise InvalidArgument(
                f"arguments do not satisfy the schema of {tool.spec.name!r}",
                reason="ARGUMENTS_INVALID",
                field_violations=[(v.path, v.description) for v in violations[:50]],
            )
        return arguments

    def _audit_arguments(self, arguments: Mapping[str, Any], tool: Tool) -> dict[str, Any]:
        """Non-secret scalars in clear; secret-ish fields and structures only as HMACs."""
        out: dict[str, Any] = {}
        for name, value in arguments.items():
            secretish = name in tool.spec.secret_fields or _SECRETISH.search(name) is not None
            if not secretish and (
                isinstance(value, bool | int | float)
                or (isinstance(value, str) and len(value) <= 128)
            ):
                out[name] = value
            else:
                out[name] = self.digest(canonical(value).decode())
        return out

    async def _check_policy(
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
        budget = _meta_int(meta, "budget_remaining")
        attrs: dict[str, Any] = {
            "arguments": arguments,
            "approval": approval,
            "budget_remaining": (
                budget if budget is not None else self.settings.default_budget_remaining_cents
            ),
            "hour": datetime.now(UTC).hour,
        }
        optional = {
            "amount": _cents(arguments.get("amount")),
            "price": _cents(arguments.get("price")) if "price" in arguments else spec.price or None,
            "max_budget": _meta_int(meta, "max_budget"),
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        # The token's tools; an MCP tool is in scope through its server's scope name.
        tools = sorted(
            verified.tools | {spec.name} if spec.scope in verified.tools else verified.tools
        )
        principal_attrs = {"tier": meta.get("tier", "standard"), "tools": tools}
        resource_attrs = {
            "name": spec.name,
            "side_effect": spec.side_effect.value,
            "pii": spec.pii,
            "category": spec.category,
        }
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
                type="Agent", id=verified.agent, attributes=_struct(principal_attrs)
            ),
            action="call_tool",
            resource=common_pb2.Entity(
                type="Tool", id=spec.name, attributes=_struct(resource_attrs)
            ),
            context_attributes=_struct(attrs),
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

    async def _authorize(
        self,
        request: tool_proxy_pb2.InvokeToolRequest,
        context: grpc.aio.ServicerContext,
        verified: VerifiedToken,
        tool: Tool,
        arguments: dict[str, Any],
        digest: str,
        call: _Call,
    ) -> policy_pb2.CheckResponse:
        spec = tool.spec
        decision = await self._check_policy(request, context, verified, tool, arguments, "none")
        self._note_decision(call, decision)
        if decision.decision == policy_pb2.DECISION_ALLOW:
            return decision
        if decision.decision != policy_pb2.DECISION_APPROVAL_REQUIRED:
            raise self._denied(decision)

        wf, gate = verified.workflow, gate_id(verified.task, spec.name, request.idempotency_key)
        call.details["gate"] = gate
        record = await self.approvals.get(wf, gate)
        reason = decision.approval_reason or f"{spec.name} requires approval"
        if record is None:
            record = await self.approvals.request(
                wf,
                gate,
                tool=spec.name,
                task_id=verified.task,
                reason=reason,
                arguments_digest=digest,
            )
        state = record.get("state")
        if state == PENDING or (state == APPROVED and record.get("arguments_digest") != digest):
            if state == APPROVED:
                # Approved for other arguments: this call needs its own approval.
                raise PermissionDenied(
                    "the approval was given for other arguments",
                    reason="APPROVAL_ARGUMENTS_CHANGED",
                    metadata={"gate": gate},
                )
            raise FailedPrecondition(
                f"{spec.name!r} needs a human approval (gate {gate})",
                reason="APPROVAL_REQUIRED",
                metadata={"gate": gate, "reason": reason},
                violations=[("APPROVAL", f"workflows/{wf}/gates/{gate}", reason)],
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
        approved = await self._check_policy(request, context, verified, tool, arguments, "approved")
        self._note_decision(call, approved)
        call.details["approval"] = "approved"
        if approved.decision != policy_pb2.DECISION_ALLOW:
            raise self._denied(approved)
        return approved

    def _note_decision(self, call: _Call, decision: policy_pb2.CheckResponse) -> None:
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
    def _denied(decision: policy_pb2.CheckResponse) -> PermissionDenied:
        return PermissionDenied(
            "denied by policy",
            reason="POLICY_DENIED",
            metadata={
                "decision_id": decision.decision_id,
                "policies": ",".join(decision.determining_policies),
            },
        )

    async def _secret(self, tool: Tool, token: str, verified: VerifiedToken) -> ToolSecret:
        """The tool's secret; from the cache only for a token verified and scoped above."""
        scope = tool.spec.scope
        ttl = self.settings.secret_cache_ttl_s
        cached = self._secrets.get(scope)
        now = time.monotonic()
        if cached is not None and ttl > 0 and now - cached[1] < ttl:
            return cached[0]
        try:
            secret = await self.vault.read_tool_secret(scope, token=token)
        except (VaultPermissionDenied, InvalidToken):
            # Scoped per the lookup, refused by Vault: revoked or used up since.
            self.tokens.evict_accessors([verified.info.accessor])
            raise Unauthenticated("Vault refused the task token", reason="TOKEN_INVALID") from None
        except ToolSecretNotFound:
            raise FailedPrecondition(
                f"no secret is stored for {tool.spec.name!r}", reason="TOOL_SECRET_MISSING"
            ) from None
        except VaultUnavailable:
            raise Unavailable(
                "Vault unreachable: cannot read the tool secret",
                reason="VAULT_UNAVAILABLE",
                retry_after_s=1.0,
            ) from None
        if ttl > 0:
            previous = self._secrets.get(scope)
            if previous is None or previous[0].version <= secret.version:
                self._secrets[scope] = (secret, now)
        return secret

    async def _secret_then_allow(
        self, call: _Call, tool: Tool, token: str, verified: VerifiedToken
    ) -> ToolSecret | None:
        """The tool's secret, then the ``allow`` record (no audit record, no call)."""
        secret = await self._secret(tool, token, verified) if tool.spec.requires_secret else None
        if secret is not None:
            call.details["key_version"] = secret.version
        await self._record(call, "allow", required=True)
        return secret

    async def _give_back(self, spend: asyncio.Future[int], verified: VerifiedToken) -> None:
        """Return the use reserved by ``spend`` (a call that will not execute spends none).

        Waits for the reservation to settle (a CAS in flight cannot be called back); if it
        failed there is nothing to return. Runs to its end even when the caller is
        cancelled. A failed give-back only shrinks the budget, never widens it."""

        async def settle() -> None:
            try:
                await spend
            except BaseException:
                return  # nothing was spent (or the outcome is unknown: never refund that)
            await self.ledger.give_back(verified)

        await self._detached.run(settle())

    def _backend_timeout(self, context: grpc.aio.ServicerContext, tool: Tool) -> float:
        timeout = tool.spec.timeout_s or self.settings.backend_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining - _CALL_MARGIN_S)
        if timeout <= 0:
            raise DeadlineExceeded("no time left to call the tool", reason="DEADLINE_EXCEEDED")
        return timeout

    # -- audit ------------------------------------------------------------------------
    async def _record(self, call: _Call, outcome: str, *, required: bool = False) -> None:
        """Write a record and wait for it; ``required``: refuse the call if it fails."""
        details = {
            "tool": call.tool,
            "agent": call.agent,
            "claimed_principal": call.claimed_principal,
            **call.details,
        }
        try:
            stored = await self.audit.append(
                audit_pb2.AUDIT_KIND_TOOL_CALL,
                workflow_id=call.workflow_id,
                task_id=call.task_id,
                outcome=outcome,
                resource=call.tool,
                decision_id=call.decision_id,
                details=details,
            )
        except Exception as exc:
            log.error("audit_write_failed", outcome=outcome, tool=call.tool, error=repr(exc))
            if required:
                raise Unavailable(
                    "audit trail unavailable: the call is refused",
                    reason="AUDIT_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from None
            return
        call.receipt = self.audit.receipt(stored)

    async def _record_executed(self, call: _Call) -> None:
        """The ``executed`` record: deferred, so it rides on the chain's next record (or
        is written within the linger) instead of costing a write of its own. It says
        what happened after the ``allow`` record of the same decision id, which holds the
        call's arguments and decision. Back-pressure: a full backlog is written first."""
        if self.audit.deferred >= _MAX_PENDING_AUDITS:
            await self._flush_logged()
        details = {
            "tool": call.tool,
            "agent": call.agent,
            "latency_ms": round((time.monotonic() - call.started) * 1000, 3),
        }
        if "uses_left" in call.details:
            details["uses_left"] = call.details["uses_left"]
        self.audit.defer(
            audit_pb2.AUDIT_KIND_TOOL_CALL,
            workflow_id=call.workflow_id,
            task_id=call.task_id,
            outcome="executed",
            resource=call.tool,
            decision_id=call.decision_id,
            details=details,
        )

    async def _flush_logged(self) -> None:
        try:
            await self.audit.flush()
        except Exception as exc:
            log.error("audit_write_failed", outcome="deferred", error=repr(exc))

    async def drain(self) -> None:
        """Wait for uses being given back and effects being run and recorded (also those
        whose callers went away); write the deferred audit records."""
        await self._detached.wait()
        await self._flush_logged()

    # -- ListTools --------------------------------------------------------------------
    async def ListTools(
        self,
        request: tool_proxy_pb2.ListToolsRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> tool_proxy_pb2.ListToolsResponse:
        if isinstance(request, Malformed):
            raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
        if request.page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative", field_violations=[("page_size", "must be >= 0")]
            )
        size = min(request.page_size or 100, _MAX_PAGE)
        after = ""
        if request.page_token:
            try:
                after = json.loads(base64.urlsafe_b64decode(request.page_token))["after"]
                if not isinstance(after, str):
                    raise TypeError("after")
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidArgument(
                    "invalid page_token", field_violations=[("page_token", type(exc).__name__)]
                ) from None
        names = [n for n in self.registry.names() if n > after]
        page = names[:size]
        response = tool_proxy_pb2.ListToolsResponse()
        for name in page:
            tool = self.registry.get(name)
            if tool is None:
                continue
            spec = tool.spec
            response.tools.append(
                tool_proxy_pb2.Tool(
                    name=spec.name,
                    description=spec.description,
                    input_schema=_struct(dict(spec.input_schema)),
                    side_effect_class=spec.side_effect.proto,  # type: ignore[arg-type]
                    backend=spec.backend.proto,  # type: ignore[arg-type]
                    requires_secret=spec.requires_secret,
                )
            )
        if len(names) > size:
            response.next_page_token = base64.urlsafe_b64encode(
                json.dumps({"after": page[-1]}).encode()
            ).decode()
        return response


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to end, whatever its outcome (it was already failed over)."""
    try:
        await future
    except BaseException:
        if not future.done():
            raise  # we were cancelled ourselves


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


def _check_caller_holds_token(verified: VerifiedToken) -> None:
    """The calling workload's certificate must name the agent the token was issued to
    (skipped only on a plaintext debugging server, which has no verified caller)."""
    caller = peer()
    if caller is None:
        return
    if caller.kind != "agent" or caller.name != verified.agent:
        raise PermissionDenied(
            f"the task token was issued to agent {verified.agent!r}, not to {caller}",
            reason="TOKEN_NOT_CALLERS",
            metadata={"caller": caller.spiffe_id, "token_agent": verified.agent},
        )
