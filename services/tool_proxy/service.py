"""ToolProxyService RPCs: the governed path from an agent to a tool, and the one door
through which a human decision on a tool-call approval reaches the proxy.

Each job lives in a module of its own; this one wires them and serves the RPCs:

* ``pipeline.py``: InvokeTool's steps, in order, failing closed at every one;
* ``policy_check.py``: the policy decision (remote or embedded);
* ``approval_flow.py``: the approval flow (``APPROVAL_REQUIRED``, ``DecideApproval``) over
  ``approvals.py``, the store of approvals (the proxy's own state);
* ``tool_secrets.py``: tool secrets read with the caller's token, cached;
* ``recording.py``: the audit records; ``catalog.py``: ListTools; ``wire.py``: decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from services.tool_proxy.approval_flow import ApprovalFlow
from services.tool_proxy.approvals import ApprovalStore
from services.tool_proxy.budgets import LiveBudgets
from services.tool_proxy.catalog import list_tools
from services.tool_proxy.embedded_policy import EmbeddedPolicy
from services.tool_proxy.governed import GovernedSteps
from services.tool_proxy.idempotency import IdempotencyStore
from services.tool_proxy.limits import RateLimiter
from services.tool_proxy.pipeline import CallPipeline
from services.tool_proxy.policy_check import PolicyCheck
from services.tool_proxy.recording import AuditSink, CallRecord, Recorder
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tokens import TokenChecker, UseLedger
from services.tool_proxy.tool_secrets import SecretReader, ToolSecrets
from services.tool_proxy.tools.registry import ToolRegistry
from services.tool_proxy.wire import Malformed, safe_deserializer
from tessera.frozen import FrozenAgents
from tessera.runtime.errors import TesseraError
from tessera.v1 import policy_pb2_grpc, tool_proxy_pb2, tool_proxy_pb2_grpc

__all__ = ["AuditSink", "Malformed", "SecretReader", "ToolProxyServicer", "safe_deserializer"]


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
        budgets: LiveBudgets | None = None,
        frozen: FrozenAgents | None = None,
    ) -> None:
        """Exactly one of ``policy`` (remote mode: the policy service's stub) and
        ``embedded_policy`` (embedded mode) decides. ``budgets`` reads the live
        ``budget_remaining`` (default: the token meta's, or the configured default);
        ``frozen``, the agents frozen by an operator (default: none is)."""
        self.settings = settings
        self.registry = registry
        self.recorder = Recorder(audit, digest)
        self.approval_flow = ApprovalFlow(
            store=approvals,
            policy=PolicyCheck(
                settings=settings,
                policy=policy,
                embedded_policy=embedded_policy,
                budgets=budgets,
                frozen=frozen,
            ),
            recorder=self.recorder,
        )
        self.steps = GovernedSteps(
            settings=settings, idempotency=idempotency, recorder=self.recorder
        )
        self.secrets = ToolSecrets(settings=settings, vault=vault, tokens=tokens)
        self.limiter = limiter
        self.pipeline = CallPipeline(
            settings=settings,
            registry=registry,
            tokens=tokens,
            ledger=ledger,
            secrets=self.secrets,
            limiter=limiter,
            steps=self.steps,
            flow=self.approval_flow,
            recorder=self.recorder,
        )

    @property
    def idempotency(self) -> IdempotencyStore:
        """The store of effects (tests put a fault injector in front of it)."""
        return self.steps.idempotency

    @idempotency.setter
    def idempotency(self, store: IdempotencyStore) -> None:
        self.steps.idempotency = store

    async def InvokeTool(
        self,
        request: tool_proxy_pb2.InvokeToolRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> tool_proxy_pb2.InvokeToolResponse:
        call = CallRecord(started=time.monotonic())
        try:
            response = await self.pipeline.invoke(request, context, call)
        except TesseraError as exc:
            await self.recorder.record_refusal(call, exc)
            raise
        return response

    async def DecideApproval(
        self,
        request: tool_proxy_pb2.DecideApprovalRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> tool_proxy_pb2.DecideApprovalResponse:
        return await self.approval_flow.decide(request)

    async def ListTools(
        self,
        request: tool_proxy_pb2.ListToolsRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> tool_proxy_pb2.ListToolsResponse:
        return list_tools(self.registry, request)

    async def drain(self) -> None:
        """Wait for uses being given back and effects being run and recorded (also those
        whose callers went away); write the deferred audit records."""
        await self.pipeline.drain()
        await self.recorder.flush_logged()
