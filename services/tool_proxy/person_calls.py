"""A person's tool call (the MCP face), governed like an agent's.

The same steps as InvokeTool's (README.md), with the person the front door verified as
the principal instead of a task token's agent: tool exists → arguments (size, hostile
input, schema) and the idempotency key (required for tools with side effects) → rate
limits (per person and per tool) → policy, ``User::<name>`` in their groups (→ approval
by another person) → idempotency claim (a repeated call replays the recorded result) →
the tool secret (read with a one-use token minted for this call) and the awaited
``allow`` record → backend under a deadline, outcome recorded → ``executed`` record.
Refusals are recorded by the caller (:meth:`PersonCalls.call` raises them), except those
of the authorized part, which outlives its caller and records its own.

Audit records name the person: ``principal`` (their name), ``principal_kind`` ``user``,
``via`` ``mcp``; workflow id ``people``, task id ``mcp-<call id>``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from services.tool_proxy.approval_flow import ApprovalFlow
from services.tool_proxy.approvals import PEOPLE
from services.tool_proxy.execution import Detached, Execution, canonical
from services.tool_proxy.governed import GovernedSteps
from services.tool_proxy.idempotency import Claim, Replay, effect_id
from services.tool_proxy.limits import RateLimiter
from services.tool_proxy.recording import CallRecord, Recorder
from services.tool_proxy.tool_secrets import CallTokenMinter, ToolSecrets
from services.tool_proxy.tools.registry import CallInfo, Tool, ToolRegistry
from tessera.runtime.errors import InvalidArgument, NotFound, TesseraError
from tessera.runtime.principal import Principal
from tessera.v1 import audit_pb2

__all__ = ["PersonCallResult", "PersonCalls", "person_workflow"]


def person_workflow(person: str) -> str:
    """The namespace of a person's effects: their idempotency keys are theirs alone (one
    person's key never replays another person's result)."""
    return f"{PEOPLE}/{person}"


@dataclass(frozen=True, slots=True)
class PersonCallResult:
    result: dict[str, Any]
    decision_id: str
    replayed: bool
    effect_id: str
    """The idempotency record's key (side-effecting tools; "" for read-only ones)."""
    receipt: audit_pb2.AuditReceipt | None
    """The awaited audit record of the decision (``allow``, or ``replayed``)."""


class PersonCalls:
    def __init__(
        self,
        *,
        registry: ToolRegistry,
        steps: GovernedSteps,
        limiter: RateLimiter,
        flow: ApprovalFlow,
        secrets: ToolSecrets,
        minter: CallTokenMinter,
        recorder: Recorder,
    ) -> None:
        self.registry = registry
        self.steps = steps
        self.limiter = limiter
        self.flow = flow
        self.secrets = secrets
        self.minter = minter
        self.recorder = recorder
        self._detached = Detached()

    async def drain(self) -> None:
        await self._detached.wait()

    @staticmethod
    def new_record(principal: Principal) -> CallRecord:
        """The audit record of one call by ``principal``."""
        call = CallRecord(started=time.monotonic())
        call.workflow_id = PEOPLE
        call.task_id = "mcp-" + uuid.uuid4().hex[:16]
        call.claimed_principal = principal.id
        call.details.update(principal=principal.id, principal_kind=principal.kind, via="mcp")
        return call

    async def call(
        self,
        principal: Principal,
        name: str,
        arguments: dict[str, Any],
        key: str,
        call: CallRecord,
        *,
        remaining_s: float | None,
    ) -> PersonCallResult:
        """Run ``name`` for ``principal``, or raise the refusal (a TesseraError)."""
        call.tool = name[:200]
        tool = self.registry.get(name)
        if tool is None:
            raise NotFound(f"no tool named {call.tool!r}", reason="TOOL_NOT_FOUND")
        spec = tool.spec
        call.details.update(side_effect=spec.side_effect.value, backend=spec.backend.value)

        # Arguments and the idempotency key: the agent path's checks.
        values = self.steps.arguments(_struct(arguments), tool)
        digest = hashlib.sha256(canonical(values)).hexdigest()
        call.details.update(
            arguments=self.recorder.arguments(values, tool), arguments_digest=digest
        )
        self.steps.check_idempotency_key(spec, key, field="_meta.tessera/idempotencyKey")

        # Rate limits: one bucket per person (beside the gateway's own per person).
        self.limiter.acquire(agent=f"user:{principal.id}", tool=spec.name)

        # Policy, and another person's approval where it asks for one.
        decision = await self.flow.authorize_person(principal, tool, values, digest, key, call)
        eid = effect_id(person_workflow(principal.id), spec.name, key) if key else ""
        info = CallInfo(
            workflow_id=PEOPLE,
            task_id=call.task_id,
            agent="",
            decision_id=decision.decision_id,
            idempotency_key=key,
            effect_id=eid or effect_id(person_workflow(principal.id), spec.name, digest),
        )
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        claim: Claim | None = None
        if spec.side_effect.needs_idempotency_key:
            call.details["effect_id"] = eid
            began = await self.steps.begin_effect(
                eid,
                tool=tool,
                info=info,
                digest=digest,
                timeout_s=self.steps.backend_timeout(remaining_s, tool),
            )
            if isinstance(began, Replay):
                call.details["replayed"] = True
                await self.recorder.record(call, "replayed")
                return PersonCallResult(began.result, decision.decision_id, True, eid, call.receipt)
            claim = began

        # Authorized: runs to its end even if the caller goes away.
        return await self._detached.run(
            self._run(principal, tool, values, digest, info, claim, call, deadline)
        )

    async def _run(
        self,
        principal: Principal,
        tool: Tool,
        values: dict[str, Any],
        digest: str,
        info: CallInfo,
        claim: Claim | None,
        call: CallRecord,
        deadline: float | None,
    ) -> PersonCallResult:
        executed = False
        try:
            secret = None
            if tool.spec.requires_secret:
                secret = await self.secrets.get_for_person(
                    tool, self.minter, person=principal.id, call_id=call.task_id
                )
                call.details["key_version"] = secret.version
            await self.recorder.record(call, "allow", required=True)
            remaining = None if deadline is None else deadline - time.monotonic()
            run = Execution(
                tool=tool,
                arguments=values,
                secret=secret,
                info=info,
                claim=claim,
                arguments_digest=digest,
                timeout_s=self.steps.backend_timeout(remaining, tool),
            )
            executed = True
            result = await self.steps.execute(run, call)
        except TesseraError as exc:
            await self.recorder.record_refusal(call, exc)
            raise
        finally:
            if claim is not None and not executed:
                await self.steps.idempotency.release(claim)
        return PersonCallResult(result, info.decision_id, False, info.effect_id, call.receipt)


def _struct(arguments: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    try:
        out.update(arguments)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidArgument(
            "arguments are not valid JSON values",
            reason="ARGUMENTS_INVALID",
            field_violations=[("arguments", type(exc).__name__)],
        ) from None
    return out
