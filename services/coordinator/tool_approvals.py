"""The coordinator's side of a tool-approval gate: a human decision reaches the tool
proxy, which owns approvals, through ``ToolProxyService.DecideApproval`` (never a write
into its bucket). DecideGate waits for the proxy's acknowledgment before it records the
gate's decision and re-queues the workflow, so the retried tool call sees the decision.
"""

from __future__ import annotations

import time

import grpc
import structlog

from tessera.runtime.errors import Unavailable, error_details, from_rpc_error
from tessera.runtime.retry import retry_transient
from tessera.v1 import tool_proxy_pb2, tool_proxy_pb2_grpc

__all__ = ["DecidedElsewhere", "ToolApprovals"]

log = structlog.get_logger(__name__)

ATTEMPT_S = 2.0
"""Deadline of one DecideApproval call."""
WITHIN_S = 10.0
"""How long a decision keeps being retried through a proxy that is down or restarting
(never longer than the DecideGate call it serves has left)."""
_MARGIN_S = 0.1
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _TRANSIENT


class DecidedElsewhere(Exception):
    """The proxy holds an earlier, different decision on this gate (its answer after a
    coordinator crashed between the proxy's acknowledgment and saving the gate)."""

    def __init__(self, *, approved: bool, decided_by: str) -> None:
        super().__init__(f"already {'approved' if approved else 'rejected'} by {decided_by}")
        self.approved = approved
        self.decided_by = decided_by


class ToolApprovals:
    """``stub``: a ToolProxyService stub over the coordinator's own mTLS channel (None
    when no tool proxy is configured: then no tool-approval gate can exist)."""

    def __init__(
        self,
        stub: tool_proxy_pb2_grpc.ToolProxyServiceStub | None,
        *,
        attempt_s: float = ATTEMPT_S,
        within_s: float = WITHIN_S,
    ) -> None:
        self.stub = stub
        self.attempt_s = attempt_s
        self.within_s = within_s

    async def decide(
        self,
        workflow_id: str,
        gate_id: str,
        *,
        approve: bool,
        decided_by: str,
        time_left_s: float | None = None,
    ) -> tool_proxy_pb2.Approval:
        """Hand the decision to the proxy and return its acknowledgment (the stored
        approval). Retried with backoff through UNAVAILABLE / DEADLINE_EXCEEDED / ABORTED
        for at most ``within_s`` (or ``time_left_s``, the caller's remaining deadline);
        then UNAVAILABLE. Raises :class:`DecidedElsewhere` when the proxy holds another
        decision, and the proxy's own error (NOT_FOUND, PERMISSION_DENIED...) otherwise."""
        stub = self.stub
        if stub is None:
            raise Unavailable(
                "no tool proxy is configured to record the decision",
                reason="TOOL_PROXY_UNAVAILABLE",
            )
        within = self.within_s
        if time_left_s is not None:
            within = max(0.0, min(within, time_left_s - _MARGIN_S))
        give_up = time.monotonic() + within
        request = tool_proxy_pb2.DecideApprovalRequest(
            workflow_id=workflow_id,
            gate_id=gate_id,
            decision=(
                tool_proxy_pb2.APPROVAL_DECISION_APPROVE
                if approve
                else tool_proxy_pb2.APPROVAL_DECISION_REJECT
            ),
            decided_by=decided_by,
        )

        async def attempt() -> tool_proxy_pb2.DecideApprovalResponse:
            timeout = max(0.05, min(self.attempt_s, give_up - time.monotonic()))
            response: tool_proxy_pb2.DecideApprovalResponse = await stub.DecideApproval(
                request, timeout=timeout
            )
            return response

        try:
            response = await retry_transient(
                attempt, within_s=within, what="decide_approval", retry_if=_transient
            )
        except grpc.aio.AioRpcError as err:
            details = error_details(err)
            if details.reason == "APPROVAL_ALREADY_DECIDED":
                raise DecidedElsewhere(
                    approved=details.metadata.get("state") == "approved",
                    decided_by=details.metadata.get("decided_by", ""),
                ) from None
            log.warning(
                "decide_approval_failed",
                workflow_id=workflow_id,
                gate=gate_id,
                code=err.code().name,
                reason=details.reason,
            )
            if _transient(err):
                raise Unavailable(
                    "the tool proxy did not acknowledge the decision; retry",
                    reason="TOOL_PROXY_UNAVAILABLE",
                    retry_after_s=1.0,
                    metadata={"gate": gate_id},
                ) from None
            raise from_rpc_error(err) from None
        return response.approval
