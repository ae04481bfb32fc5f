"""The tool proxy's audit records: what one InvokeTool says (never a token or a secret),
how its outcome is named, and the writes (awaited ``allow``, deferred ``executed``)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import structlog

from services.tool_proxy.execution import canonical
from services.tool_proxy.tools.registry import Tool
from tessera.audit.scrub import scrub
from tessera.runtime.errors import TesseraError, Unavailable
from tessera.runtime.logging import REDACTED
from tessera.v1 import audit_pb2

__all__ = ["AuditSink", "CallRecord", "Recorder", "approver_arguments", "outcome"]

log = structlog.get_logger(__name__)

_SECRETISH = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|credential|ssn|card|iban|account_number|"
    r"cvv|pin|authorization|private)",
    re.IGNORECASE,
)
_MAX_PENDING_AUDITS = 256
_MAX_SHOWN_CHARS = 512


def approver_arguments(arguments: Mapping[str, Any], tool: Tool) -> dict[str, Any]:
    """A call's arguments as the person approving it sees them: what they approve, in
    clear, except secret-bearing values (the tool's secret fields, credential-like names
    at any depth, token-like strings), which are ``[redacted]``; long strings are cut."""

    def shown(value: Any) -> Any:
        if isinstance(value, str) and len(value) > _MAX_SHOWN_CHARS:
            return value[:_MAX_SHOWN_CHARS] + "…"
        if isinstance(value, Mapping):
            return {k: shown(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shown(v) for v in value]
        return value

    out: dict[str, Any] = {}
    for name, value in arguments.items():
        secretish = name in tool.spec.secret_fields or _SECRETISH.search(name) is not None
        out[name] = REDACTED if secretish else scrub({name: shown(value)})[name]
    return out


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


@dataclass(slots=True)
class CallRecord:
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
    refusal_recorded: bool = False
    """The refusal record was written (by the part of the call that outlives its caller)."""


def outcome(exc: TesseraError) -> str:
    """The audit outcome of a refused call."""
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


class Recorder:
    """Writes the proxy's audit records to its chain."""

    def __init__(self, audit: AuditSink, digest: Callable[[str], str]) -> None:
        self.audit = audit
        self.digest = digest

    def arguments(self, arguments: Mapping[str, Any], tool: Tool) -> dict[str, Any]:
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

    async def record(self, call: CallRecord, outcome: str, *, required: bool = False) -> None:
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

    async def record_refusal(self, call: CallRecord, exc: TesseraError) -> None:
        """The record of a refused call, once (an authorized call records its own, as its
        caller may be gone; the servicer then writes none)."""
        if call.refusal_recorded:
            return
        call.refusal_recorded = True
        call.details.update(code=exc.code.name, reason=exc.reason)
        await self.record(call, outcome(exc))

    async def record_executed(self, call: CallRecord) -> None:
        """The ``executed`` record: deferred, so it rides on the chain's next record (or
        is written within the linger) instead of costing a write of its own. It says
        what happened after the ``allow`` record of the same decision id, which holds the
        call's arguments and decision (and, for a backend that reports one, its
        ``exchange``: e.g. an A2A agent's task id and final state). Back-pressure: a
        full backlog is written first."""
        if self.audit.deferred >= _MAX_PENDING_AUDITS:
            await self.flush_logged()
        details = {
            "tool": call.tool,
            "agent": call.agent,
            "latency_ms": round((time.monotonic() - call.started) * 1000, 3),
        }
        for key in ("uses_left", "exchange"):
            if key in call.details:
                details[key] = call.details[key]
        self.audit.defer(
            audit_pb2.AUDIT_KIND_TOOL_CALL,
            workflow_id=call.workflow_id,
            task_id=call.task_id,
            outcome="executed",
            resource=call.tool,
            decision_id=call.decision_id,
            details=details,
        )

    async def record_decision(
        self, *, workflow_id: str, gate: str, record: Mapping[str, Any], caller: str
    ) -> None:
        """The record of a human decision on a tool-call approval, as the proxy stored
        it (``AUDIT_KIND_APPROVAL``). A failed write is logged: the decision is stored,
        and the coordinator audits the gate decision on its own chain too."""
        state = str(record.get("state", ""))
        try:
            await self.audit.append(
                audit_pb2.AUDIT_KIND_APPROVAL,
                workflow_id=workflow_id,
                task_id=str(record.get("task_id", "")),
                outcome=state,
                resource=str(record.get("tool", "")),
                decision_id="",
                details={
                    "gate": gate,
                    "decided_by": str(record.get("decided_by", "")),
                    "caller": caller,
                    "arguments_digest": str(record.get("arguments_digest", "")),
                },
            )
        except Exception as exc:
            log.error("audit_write_failed", outcome=state, gate=gate, error=repr(exc))

    async def flush_logged(self) -> None:
        try:
            await self.audit.flush()
        except Exception as exc:
            log.error("audit_write_failed", outcome="deferred", error=repr(exc))
