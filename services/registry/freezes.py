"""The freeze switch for one agent (``FreezeAgent``, ``UnfreezeAgent``,
``ListFrozenAgents``): who may use it, what it changes, and its audit records.

Callers: the operator workload (the CLI) directly, and people through the front door
(Envoy routes these three methods only; the caller table admits both). Each action is
decided here by the distributed policy set (``policy/policies/60_agents.cedar``: the
``operators`` group and the operator workload) for the verified principal
(:func:`tessera.runtime.principal.principal_of`), and the decision is an audit record
naming it, allowed or refused. A freeze or unfreeze is then audited before the change, so
none goes unrecorded, and the freeze names the principal (``frozen_by``).
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from tessera.audit import AuditWriter
from tessera.frozen import FrozenAgents, frozen_key
from tessera.policy.control_plane import ControlPlaneAuthorization
from tessera.registry import Registry
from tessera.runtime.errors import InvalidArgument, Unavailable
from tessera.runtime.principal import Principal
from tessera.v1 import audit_pb2, registry_pb2

__all__ = ["Freezes"]

log = structlog.get_logger(__name__)

_MAX_REASON_CHARS = 500
_SERVICE = "/tessera.v1.RegistryService"
# Reading changes nothing: only a refusal is recorded.
_READS = frozenset({"list_frozen_agents", "list_agents"})


class Freezes:
    def __init__(
        self,
        registry: Registry,
        audit: AuditWriter,
        frozen: FrozenAgents,
        authz: ControlPlaneAuthorization,
        *,
        write_timeout_s: float,
        max_name_chars: int,
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.frozen = frozen
        self.authz = authz
        self.write_timeout_s = write_timeout_s
        self._max_name_chars = max_name_chars

    def _agent_name(self, name: str) -> str:
        try:
            return frozen_key(name[: self._max_name_chars + 1])
        except ValueError as exc:
            raise InvalidArgument(
                "not an agent name", reason="BAD_AGENT_NAME", field_violations=[("name", str(exc))]
            ) from None

    async def _authorized(
        self, context: grpc.aio.ServicerContext, method: str, action: str, agent: str
    ) -> Principal:
        principal = await self.authz.principal(context, f"{_SERVICE}/{method}")
        await self.authz.require(
            principal,
            action,
            "AgentName",
            agent,
            {"name": agent},
            resource_name=f"agent {agent}" if agent != "*" else "the frozen agents",
            audit_allowed=action not in _READS,
        )
        return principal

    async def _audit_change(self, outcome: str, name: str, principal: str, reason: str) -> None:
        """Written before the change (no freeze nor unfreeze goes unaudited)."""
        try:
            await self.audit.append(
                audit_pb2.AUDIT_KIND_AGENT_FREEZE,
                outcome=outcome,
                resource=f"registry/agent/{name}",
                details={"principal": principal, "reason": reason},
            )
        except Unavailable as exc:
            raise Unavailable(
                "the audit trail is unavailable: nothing was changed",
                reason="AUDIT_UNAVAILABLE",
                retry_after_s=1.0,
            ) from exc

    async def freeze(
        self, request: registry_pb2.FreezeAgentRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.FreezeAgentResponse:
        name = self._agent_name(request.name)
        if len(request.reason) > _MAX_REASON_CHARS:
            raise InvalidArgument(
                "the reason is too long",
                reason="BAD_REASON",
                field_violations=[("reason", f"at most {_MAX_REASON_CHARS} characters")],
            )
        by = (await self._authorized(context, "FreezeAgent", "freeze_agent", name)).name
        record = registry_pb2.FrozenAgent(name=name, frozen_by=by, reason=request.reason)
        record.freeze_time.GetCurrentTime()
        await self._audit_change("frozen", name, by, request.reason)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                in_force = await self.frozen.freeze(record)
                # Its replicas leave the live set: dispatch goes to other agents.
                removed = await self.registry.deregister_agent(name)
        except Exception as exc:
            raise Unavailable(
                "the freeze could not be stored; retry (freezing is idempotent)",
                reason="REGISTRY_UNAVAILABLE",
                retry_after_s=1.0,
            ) from exc
        log.warning("agent_frozen", agent=name, by=by, replicas_removed=removed)
        return registry_pb2.FreezeAgentResponse(frozen=in_force, replicas_removed=removed)

    async def unfreeze(
        self, request: registry_pb2.UnfreezeAgentRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.UnfreezeAgentResponse:
        name = self._agent_name(request.name)
        by = (await self._authorized(context, "UnfreezeAgent", "unfreeze_agent", name)).name
        await self._audit_change("unfrozen", name, by, "")
        try:
            async with asyncio.timeout(self.write_timeout_s):
                was = await self.frozen.unfreeze(name)
        except Exception as exc:
            raise Unavailable(
                "the freeze could not be lifted; retry", reason="REGISTRY_UNAVAILABLE"
            ) from exc
        log.warning("agent_unfrozen", agent=name, by=by, was_frozen=was)
        return registry_pb2.UnfreezeAgentResponse(was_frozen=was)

    async def list_agents(
        self, request: registry_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAgentsResponse:
        """The live replicas and the freezes in force (the console's agents page)."""
        await self._authorized(context, "ListAgents", "list_agents", "*")
        try:
            async with asyncio.timeout(self.write_timeout_s):
                replicas = await self.registry.agents()
                frozen = await self.frozen.read_all()
        except Exception as exc:
            raise Unavailable(
                "the registry could not be read", reason="REGISTRY_UNAVAILABLE"
            ) from exc
        replicas.sort(key=lambda a: (a.name, a.instance_id))
        return registry_pb2.ListAgentsResponse(agents=replicas, frozen=frozen)

    async def list(
        self, request: registry_pb2.ListFrozenAgentsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListFrozenAgentsResponse:
        await self._authorized(context, "ListFrozenAgents", "list_frozen_agents", "*")
        try:
            async with asyncio.timeout(self.write_timeout_s):
                agents = await self.frozen.read_all()
        except Exception as exc:
            raise Unavailable(
                "the frozen agents could not be read", reason="REGISTRY_UNAVAILABLE"
            ) from exc
        return registry_pb2.ListFrozenAgentsResponse(agents=agents)
