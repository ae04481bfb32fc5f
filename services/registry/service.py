"""RegistryService: an agent replica registers (and heartbeats) under the name its
certificate carries, and nothing else.

The caller table (tessera/identity/callers.py) already lets only agents reach this
service (and the operator and the front door its freeze RPCs); here the descriptor is
checked against the caller (``billing`` may register only ``billing``), against the limits a hostile
descriptor would break (sizes, counts, names, versions, the endpoint's shape, output
schemas that are not usable draft 2020-12), and the heartbeat time is the registry's own
clock. Every refusal is answered with a precise status and written to the audit chain.

Freezes (``FreezeAgent``, services/registry/freezes.py): the registry owns the frozen
bucket (tessera/frozen.py). A frozen agent's entries are removed and its registrations
refused; coordinators and tool proxies follow the bucket (revoking its running attempts'
tokens, refusing its calls).
"""

from __future__ import annotations

import asyncio
import re

import grpc
import structlog
from google.protobuf import duration_pb2, json_format

from services.registry.freezes import Freezes
from tessera import semver
from tessera.audit import AuditWriter
from tessera.frozen import FrozenAgents
from tessera.jsonschema import SchemaError, check_schema
from tessera.policy.control_plane import ControlPlaneAuthorization
from tessera.registry import Registry, registry_key
from tessera.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    TesseraError,
    Unavailable,
)
from tessera.runtime.grpc_authz import peer
from tessera.v1 import agent_pb2, audit_pb2, registry_pb2, registry_pb2_grpc

__all__ = ["Limits", "RegistryServicer"]

log = structlog.get_logger(__name__)

_CAPABILITY_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
_HOST = re.compile(r"^[A-Za-z0-9._-]+$|^\[[0-9A-Fa-f:.]+\]$")


class Limits:
    """What one descriptor may hold. The registry is read on every dispatch and plan
    validation, so a replica must not be able to make those reads expensive."""

    max_descriptor_bytes = 256 * 1024
    max_capabilities = 64
    max_name_chars = 64
    max_endpoint_chars = 255
    max_version_chars = 64


def _endpoint_problem(endpoint: str) -> str | None:
    if not endpoint:
        return "required (host:port where the replica serves AgentService)"
    if len(endpoint) > Limits.max_endpoint_chars:
        return f"longer than {Limits.max_endpoint_chars} characters"
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not _HOST.match(host):
        return "must be host:port"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return "port must be 1..65535"
    return None


def _violations(agent: agent_pb2.AgentDescriptor) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if agent.ByteSize() > Limits.max_descriptor_bytes:
        return [("agent", f"larger than {Limits.max_descriptor_bytes} bytes")]
    try:
        registry_key(agent.name or "-", agent.instance_id)
    except ValueError as exc:
        found.append(("agent.instance_id", str(exc)))
    if len(agent.instance_id) > Limits.max_name_chars:
        found.append(("agent.instance_id", f"longer than {Limits.max_name_chars} characters"))
    problem = _endpoint_problem(agent.endpoint)
    if problem is not None:
        found.append(("agent.endpoint", problem))
    if not agent.capabilities:
        found.append(("agent.capabilities", "an agent offers at least one capability"))
    if len(agent.capabilities) > Limits.max_capabilities:
        found.append(("agent.capabilities", f"more than {Limits.max_capabilities}"))
        return found
    seen: set[str] = set()
    for index, contract in enumerate(agent.capabilities):
        where = f"agent.capabilities[{index}]"
        if len(contract.name) > Limits.max_name_chars * 2 or not _CAPABILITY_NAME.match(
            contract.name
        ):
            found.append((f"{where}.name", "lower-case dotted name required"))
        elif contract.name in seen:
            found.append((f"{where}.name", f"{contract.name!r} declared twice"))
        seen.add(contract.name)
        try:
            if len(contract.version) > Limits.max_version_chars:
                raise ValueError("too long")
            semver.parse(contract.version)
        except ValueError:
            found.append((f"{where}.version", "semantic version required, e.g. 1.2.0"))
        if contract.HasField("output_schema"):
            # The coordinator checks every answer against it: refuse here, where the agent
            # learns which part is wrong, rather than fail each of its answers later.
            try:
                check_schema(
                    json_format.MessageToDict(contract.output_schema),
                    path=f"{where}.output_schema",
                )
            except SchemaError as exc:
                found.extend((v.path, v.description) for v in exc.violations[:10])
    return found


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        registry: Registry,
        audit: AuditWriter,
        frozen: FrozenAgents,
        *,
        write_timeout_s: float,
        authz: ControlPlaneAuthorization | None = None,
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.frozen = frozen
        self.write_timeout_s = write_timeout_s
        self.freezes = Freezes(
            registry,
            audit,
            frozen,
            authz or ControlPlaneAuthorization(None, None),
            write_timeout_s=write_timeout_s,
            max_name_chars=Limits.max_name_chars,
        )

    def _lease(self) -> tuple[duration_pb2.Duration, duration_pb2.Duration]:
        lease, interval = duration_pb2.Duration(), duration_pb2.Duration()
        lease.FromMilliseconds(int(self.registry.ttl_s * 1000))
        interval.FromMilliseconds(int(self.registry.ttl_s * 1000 / 3))
        return lease, interval

    def _caller_name(self, claimed: str) -> str:
        """The name the caller may register under: its certificate's. On a plaintext
        debugging server (``TESSERA_INSECURE_PLAINTEXT``) there is no verified caller and
        the claimed name is taken as given, as everywhere else in that mode."""
        caller = peer()
        if caller is None:
            return claimed
        if caller.kind != "agent":  # the caller table admits agents only
            raise PermissionDenied(
                "only an agent's workload identity may register", reason="NOT_AN_AGENT"
            )
        return caller.name

    async def _refuse(self, error: TesseraError, *, caller: str, agent: str) -> None:
        log.warning("registration_refused", caller=caller, agent=agent, reason=error.reason)
        try:
            await self.audit.append(
                audit_pb2.AUDIT_KIND_REQUEST_REJECTED,
                outcome="refused",
                resource=f"registry/agent/{agent[: Limits.max_name_chars]}",
                details={"caller": caller, "reason": error.reason, "message": error.message},
            )
        except Unavailable as exc:  # refused either way; the log line stays
            log.error("registration_refusal_unaudited", error=repr(exc))
        raise error

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        agent = request.agent
        caller = self._caller_name(agent.name)
        if agent.name != caller:
            await self._refuse(
                PermissionDenied(
                    f"agent {caller!r} may register only under its own name, "
                    f"not {agent.name[: Limits.max_name_chars]!r}",
                    reason="NAME_NOT_CALLERS",
                    metadata={"caller": caller},
                ),
                caller=caller,
                agent=agent.name,
            )
        violations = _violations(agent)
        if violations:
            await self._refuse(
                InvalidArgument(
                    "the agent descriptor is malformed",
                    reason="BAD_DESCRIPTOR",
                    field_violations=violations,
                ),
                caller=caller,
                agent=agent.name,
            )
        entry = agent_pb2.AgentDescriptor()
        entry.CopyFrom(agent)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                freeze = await self.frozen.read(caller)
                if freeze is None:
                    await self.registry.register(entry)
        except Exception as exc:  # a timeout, or NATS reconnecting: the agent retries
            raise Unavailable(
                "the registry could not be written; retry", reason="REGISTRY_UNAVAILABLE"
            ) from exc
        if freeze is not None:
            await self._refuse(
                FailedPrecondition(
                    f"agent {caller!r} is frozen; an operator must unfreeze it first",
                    reason="AGENT_FROZEN",
                    metadata={"frozen_by": freeze.frozen_by},
                ),
                caller=caller,
                agent=agent.name,
            )
        lease, interval = self._lease()
        response = registry_pb2.RegisterResponse(lease=lease, heartbeat_interval=interval)
        response.heartbeat_time.GetCurrentTime()
        return response

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        caller = self._caller_name(request.name)
        if request.name != caller:
            await self._refuse(
                PermissionDenied(
                    f"agent {caller!r} may deregister only its own replicas",
                    reason="NAME_NOT_CALLERS",
                    metadata={"caller": caller},
                ),
                caller=caller,
                agent=request.name,
            )
        try:
            registry_key(caller, request.instance_id)
        except ValueError as exc:
            await self._refuse(
                InvalidArgument(
                    str(exc),
                    reason="BAD_INSTANCE_ID",
                    field_violations=[("instance_id", str(exc))],
                ),
                caller=caller,
                agent=request.name,
            )
        descriptor = agent_pb2.AgentDescriptor(name=caller, instance_id=request.instance_id)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.registry.deregister(descriptor)
        except Exception as exc:
            raise Unavailable(
                "the registry could not be written; the entry ages out after its lease",
                reason="REGISTRY_UNAVAILABLE",
            ) from exc
        return registry_pb2.DeregisterResponse()

    # -- freezes (services/registry/freezes.py) -------------------------------------------

    async def FreezeAgent(
        self, request: registry_pb2.FreezeAgentRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.FreezeAgentResponse:
        return await self.freezes.freeze(request, context)

    async def UnfreezeAgent(
        self, request: registry_pb2.UnfreezeAgentRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.UnfreezeAgentResponse:
        return await self.freezes.unfreeze(request, context)

    async def ListAgents(
        self, request: registry_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAgentsResponse:
        return await self.freezes.list_agents(request, context)

    async def ListFrozenAgents(
        self, request: registry_pb2.ListFrozenAgentsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListFrozenAgentsResponse:
        return await self.freezes.list(request, context)
