"""AuditService RPCs: a workflow's trail, verified, for whoever may read the workflow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog
from google.protobuf import timestamp_pb2
from nats.js import JetStreamContext

from services.audit_reader.trail import verified_records, workflow_attributes
from tessera.audit import PublicKeys
from tessera.audit.verify import read_all, verify_entries
from tessera.policy.control_plane import ControlPlaneAuthorization
from tessera.resource_names import workflow_id
from tessera.runtime.bus import Topology
from tessera.runtime.errors import NotFound, Unavailable
from tessera.v1 import audit_pb2, audit_pb2_grpc

log = structlog.get_logger(__name__)

_SERVICE = "/tessera.v1.AuditService"


class PublicKeyCache:
    """The signing keys' public halves, re-read from Vault at most every ``ttl_s``
    (``read`` None: a plaintext debug reader, signatures not checked)."""

    def __init__(self, read: Callable[[], Awaitable[PublicKeys]] | None, ttl_s: float) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._keys: PublicKeys | None = None
        self._at = 0.0

    async def get(self) -> PublicKeys | None:
        if self._read is None:
            return None
        if self._keys is None or time.monotonic() - self._at > self._ttl_s:
            self._keys = await self._read()
            self._at = time.monotonic()
        return self._keys


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        keys: PublicKeyCache,
        authz: ControlPlaneAuthorization,
        *,
        read_timeout_s: float,
    ) -> None:
        self.js = js
        self.topology = topology
        self.keys = keys
        self.authz = authz
        self.read_timeout_s = read_timeout_s

    async def ListWorkflowAuditRecords(
        self,
        request: audit_pb2.ListWorkflowAuditRecordsRequest,
        context: grpc.aio.ServicerContext,
    ) -> audit_pb2.ListWorkflowAuditRecordsResponse:
        wf_id = workflow_id(request.parent, field="parent")
        principal = await self.authz.principal(context, f"{_SERVICE}/ListWorkflowAuditRecords")
        timeout = min(self.read_timeout_s, context.time_remaining() or self.read_timeout_s)
        try:
            async with asyncio.timeout(timeout):
                keys = await self.keys.get()
                stored, last = await read_all(self.js, self.topology)
        except TimeoutError as exc:
            raise Unavailable("the audit trail could not be read in time") from exc
        report = verify_entries(stored, last_stream_sequence=last, keys=keys)
        records = verified_records(stored, report, wf_id)
        attributes = workflow_attributes(records)
        if attributes is None:
            raise NotFound(
                f"no audit record names {request.parent}",
                reason="WORKFLOW_NOT_FOUND",
                metadata={"workflow": request.parent},
            )
        await self.authz.require(
            principal,
            "read_workflow",
            "Workflow",
            wf_id,
            attributes,
            workflow_id=wf_id,
            resource_name=request.parent,
            audit_allowed=False,
        )
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        issues = len(report.stream_issues) + sum(len(c.issues) for c in report.chains)
        return audit_pb2.ListWorkflowAuditRecordsResponse(
            records=records,
            signatures_checked=keys is not None,
            issues=issues,
            verify_time=now,
        )
