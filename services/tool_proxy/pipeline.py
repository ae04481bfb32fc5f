"""The governed call pipeline: InvokeTool's steps in order, failing closed at every one
(README.md has the full contract).

token format → token lookup (≤ 1 s cache) → token meta matches the call → tool exists and
is in the token's scope → arguments (size, schema, hostile input, idempotency key) → rate
limits → policy Check, remote or embedded (→ approval flow, ``approval_flow.py``) →
idempotency claim (a claim taken over from a dead executor asks the tool first) → use
budget, settling while the tool secret is read with the caller's token and the ``allow``
record is written (both must succeed) → backend under a deadline, then its outcome
recorded → audit outcome. From the allow record on, the call runs to its end even if the
caller goes away, so every allow is followed by its ``executed`` record or a refusal.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import grpc

from services.tool_proxy.approval_flow import ApprovalFlow
from services.tool_proxy.execution import Detached, Execution, canonical
from services.tool_proxy.governed import GovernedSteps
from services.tool_proxy.idempotency import Claim, IdempotencyStore, Replay, effect_id
from services.tool_proxy.limits import RateLimiter
from services.tool_proxy.recording import CallRecord, Recorder
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tokens import TokenChecker, UseLedger, VerifiedToken, check_format
from services.tool_proxy.tool_secrets import ToolSecrets
from services.tool_proxy.tools.registry import CallInfo, Tool, ToolRegistry
from services.tool_proxy.wire import Malformed, metadata_value, to_struct
from tessera.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TesseraError,
)
from tessera.runtime.grpc_authz import peer
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import tool_proxy_pb2
from tessera.vault.tokens import ToolSecret

__all__ = ["CallPipeline"]


class CallPipeline:
    """Runs one InvokeTool; the servicer records its refusals. The steps every caller's
    call shares (arguments, idempotency, the backend) are ``steps``
    (:class:`~services.tool_proxy.governed.GovernedSteps`); the token steps are here."""

    def __init__(
        self,
        *,
        settings: ToolProxySettings,
        registry: ToolRegistry,
        tokens: TokenChecker,
        ledger: UseLedger,
        secrets: ToolSecrets,
        limiter: RateLimiter,
        steps: GovernedSteps,
        flow: ApprovalFlow,
        recorder: Recorder,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tokens = tokens
        self.ledger = ledger
        self.secrets = secrets
        self.limiter = limiter
        self.steps = steps
        self.flow = flow
        self.recorder = recorder
        self._detached = Detached()
        """Work that outlives its caller: uses being given back, effects being run."""

    @property
    def idempotency(self) -> IdempotencyStore:
        return self.steps.idempotency

    async def drain(self) -> None:
        """Wait for uses being given back and effects being run and recorded (also those
        whose callers went away)."""
        await self._detached.wait()

    async def invoke(
        self,
        request: tool_proxy_pb2.InvokeToolRequest | Malformed,
        context: grpc.aio.ServicerContext,
        call: CallRecord,
    ) -> tool_proxy_pb2.InvokeToolResponse:
        # 0. The request decoded at all (before anything else: nothing below is trusted).
        if isinstance(request, Malformed):
            raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
        call.tool = request.tool[:200]
        call.workflow_id = request.context.workflow_id[:128]
        call.task_id = request.context.task_id[:128]
        call.claimed_principal = request.context.principal[:128]

        # 1. Token present and well-formed (no Vault call for garbage).
        token = check_format(metadata_value(context, TASK_TOKEN_METADATA))

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
        arguments = self.steps.arguments(request.arguments, tool)
        digest = hashlib.sha256(canonical(arguments)).hexdigest()
        call.details.update(
            arguments=self.recorder.arguments(arguments, tool), arguments_digest=digest
        )
        key = request.idempotency_key
        self.steps.check_idempotency_key(spec, key)

        # 6. Rate limits.
        self.limiter.acquire(agent=verified.agent, tool=spec.name)

        # 7. Policy (and the approval flow). One call of the token's budget is reserved in
        # the ledger meanwhile (independent I/O); it is given back unless the call goes on
        # to step 9, and its errors surface only there, so the order of refusals is kept.
        spend = self.ledger.reserve(verified)
        eid = effect_id(verified.workflow, spec.name, key) if key else ""
        claim = None
        try:
            if self.flow.policy.embedded_policy is not None and not spend.done():
                # Let the reservation's request leave before the (CPU-bound) in-process
                # decision, so the two still overlap.
                await asyncio.sleep(0)
            decision = await self.flow.authorize(
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
                timeout = self.steps.backend_timeout(context.time_remaining(), tool)
                began = await self.steps.begin_effect(
                    eid, tool=tool, info=info, digest=digest, timeout_s=timeout
                )
                if isinstance(began, Replay):
                    await self._give_back(spend, verified)
                    call.details["replayed"] = True
                    if began.recovered:
                        call.details["recovered_from"] = "backend_lookup"
                    await self.recorder.record(call, "replayed")
                    return tool_proxy_pb2.InvokeToolResponse(
                        result=to_struct(began.result),
                        decision_id=decision.decision_id,
                        replayed=True,
                        receipt=call.receipt,
                    )
                claim = began
        except BaseException:
            await self._give_back(spend, verified)
            raise

        # 9-11. Authorized: from here on the call runs to its end even if its caller goes
        # away (an agent killed mid-call), so an ``allow`` record is always followed by
        # the call's outcome: ``executed``, or a refusal of the same decision id.
        return await self._detached.run(
            self._run_authorized(
                _Authorized(
                    call=call,
                    tool=tool,
                    arguments=arguments,
                    digest=digest,
                    token=token,
                    verified=verified,
                    info=info,
                    claim=claim,
                    decision_id=decision.decision_id,
                    deadline=_deadline(context),
                ),
                spend,
            )
        )

    async def _run_authorized(
        self, a: _Authorized, spend: asyncio.Future[int]
    ) -> tool_proxy_pb2.InvokeToolResponse:
        """Steps 9 to 11 of an authorized call; records its refusal itself, as its caller
        may be gone by then."""
        call, tool, verified = a.call, a.tool, a.verified
        executed = False
        try:
            await self._time_left(a, spend)  # no allow record for a call out of time
            # 9. Read the secret with the caller's token and (11a) write the awaited
            # ``allow`` record while the reservation of step 7 settles: both are round
            # trips, so overlapping them takes one off the critical path.
            allowed = asyncio.ensure_future(self._secret_then_allow(call, tool, a.token, verified))
            try:
                uses_left = await spend
            except BaseException:
                # No use could be spent: the call does not run. If the allow record was
                # written, the refusal record written next (same decision id) says so.
                await _settle(allowed)
                raise
            try:
                secret = await allowed
            except BaseException:
                await self._give_back(spend, verified)  # spent: give it back
                raise
            call.details["uses_left"] = uses_left
            timeout_s = await self._time_left(a, spend)

            # 10. The backend under the call's deadline, then (11b) its outcome recorded.
            run = Execution(
                tool=tool,
                arguments=a.arguments,
                secret=secret,
                info=a.info,
                claim=a.claim,
                arguments_digest=a.digest,
                timeout_s=timeout_s,
            )
            executed = True
            result = await self.steps.execute(run, call)
        except TesseraError as exc:
            await self.recorder.record_refusal(call, exc)
            raise
        finally:
            if a.claim is not None and not executed:
                await self.idempotency.release(a.claim)
        return tool_proxy_pb2.InvokeToolResponse(
            result=to_struct(result), decision_id=a.decision_id, receipt=call.receipt
        )

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

    async def _secret_then_allow(
        self, call: CallRecord, tool: Tool, token: str, verified: VerifiedToken
    ) -> ToolSecret | None:
        """The tool's secret, then the ``allow`` record (no audit record, no call)."""
        secret = (
            await self.secrets.get(tool, token, verified) if tool.spec.requires_secret else None
        )
        if secret is not None:
            call.details["key_version"] = secret.version
        await self.recorder.record(call, "allow", required=True)
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

    async def _time_left(self, a: _Authorized, spend: asyncio.Future[int]) -> float:
        """The backend's timeout now; out of time, the reserved use is given back."""
        try:
            return self.steps.backend_timeout(a.remaining_s(), a.tool)
        except DeadlineExceeded:
            await self._give_back(spend, a.verified)
            raise


@dataclass(frozen=True, slots=True, kw_only=True)
class _Authorized:
    """What steps 9 to 11 of an authorized call need (its caller may be gone by then)."""

    call: CallRecord
    tool: Tool
    arguments: dict[str, Any]
    digest: str
    token: str
    verified: VerifiedToken
    info: CallInfo
    claim: Claim | None
    decision_id: str
    deadline: float | None
    """The call's deadline (monotonic seconds; None: it has none)."""

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to end, whatever its outcome (it was already failed over)."""
    try:
        await future
    except BaseException:
        if not future.done():
            raise  # we were cancelled ourselves


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
