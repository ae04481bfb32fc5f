"""Who may call which RPC: the mesh's one table, enforced on every server by
:class:`tessera.runtime.grpc_authz.CallerAuthorization` from the peer's verified
certificate (its SPIFFE ID), and reproduced in docs/identity.md.

Keys are ``package.Service/Method`` or ``package.Service/*``; values are callers as
``kind/name`` (``service/coordinator``), ``kind/*`` (every agent) or ``*`` (any identity
of the mesh CA). The most specific key wins; a method in no key is refused (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping

from tessera.identity.names import WorkloadName

__all__ = ["CALLERS", "allowed_callers", "may_call"]

_GATEWAY = "service/gateway"  # Envoy, the front door: public APIs only
_OPERATOR = "service/operator"  # the local CLI and launcher

CALLERS: Mapping[str, frozenset[str]] = {
    # Public API, reached from outside only through Envoy.
    "tessera.v1.CoordinatorService/*": frozenset({_GATEWAY, _OPERATOR}),
    # The coordinator's A2A face (another binding of the same API, same authorization)
    # and its agent cards.
    "lf.a2a.v1.A2AService/*": frozenset({_GATEWAY, _OPERATOR}),
    "tessera.v1.AgentCardService/*": frozenset({_GATEWAY, _OPERATOR}),
    # Only the coordinator hands out tasks (and the live task tokens that come with them).
    "tessera.v1.AgentService/ExecuteTask": frozenset({"service/coordinator"}),
    "tessera.v1.AgentService/ExecuteTasks": frozenset({"service/coordinator"}),
    "tessera.v1.AgentService/Describe": frozenset({"service/coordinator", _OPERATOR}),
    # Only agents call tools; the tool proxy also checks the task token is the caller's.
    "tessera.v1.ToolProxyService/*": frozenset({"agent/*"}),
    # A human's decision on a tool-call approval reaches its owner, the proxy, only
    # through the coordinator (which authorized the decision).
    "tessera.v1.ToolProxyService/DecideApproval": frozenset({"service/coordinator"}),
    # The tool proxy's MCP face: people's MCP clients, through the front door only (the
    # person comes from the claims Envoy forwards; no workload calls it).
    "tessera.v1.McpService/*": frozenset({_GATEWAY}),
    # An agent registers itself (the registry checks the name is the caller's).
    "tessera.v1.RegistryService/*": frozenset({"agent/*"}),
    # Freezing an agent (the kill switch for one agent): the operator workload, and people
    # through the front door (Envoy routes these three methods only); the registry then
    # decides by policy who may (policy/policies/60_agents.cedar: operators).
    "tessera.v1.RegistryService/FreezeAgent": frozenset({_GATEWAY, _OPERATOR}),
    "tessera.v1.RegistryService/UnfreezeAgent": frozenset({_GATEWAY, _OPERATOR}),
    "tessera.v1.RegistryService/ListFrozenAgents": frozenset({_GATEWAY, _OPERATOR}),
    "tessera.v1.RegistryService/ListAgents": frozenset({_GATEWAY, _OPERATOR}),
    # A workflow's audit trail, verified: people through the front door (decided by
    # read_workflow), and the operator.
    "tessera.v1.AuditService/*": frozenset({_GATEWAY, _OPERATOR}),
    # The console's pages and sessions: people, through the front door only.
    "tessera.v1.ConsoleService/*": frozenset({_GATEWAY}),
    "tessera.v1.PlannerService/*": frozenset({"service/coordinator", _OPERATOR}),
    "tessera.v1.PolicyService/Check": frozenset(
        {"service/tool-proxy", "service/coordinator", _OPERATOR}
    ),
    "tessera.v1.PolicyService/*": frozenset({_OPERATOR}),
    # The served set's version and coverage: also people, through the front door.
    "tessera.v1.PolicyService/GetPolicySet": frozenset({_GATEWAY, _OPERATOR}),
    # Envoy's configuration and certificates come from the gateway control plane.
    "envoy.service.discovery.v3.AggregatedDiscoveryService/*": frozenset({_GATEWAY}),
    "envoy.service.secret.v3.SecretDiscoveryService/*": frozenset({_GATEWAY}),
    "grpc.health.v1.Health/*": frozenset({"*"}),
    "grpc.reflection.v1alpha.ServerReflection/*": frozenset({_OPERATOR}),
    "grpc.reflection.v1.ServerReflection/*": frozenset({_OPERATOR}),
}


def allowed_callers(method: str, table: Mapping[str, frozenset[str]] = CALLERS) -> frozenset[str]:
    """Callers allowed for ``/package.Service/Method`` (empty: nobody)."""
    service, _, name = method.lstrip("/").partition("/")
    exact = table.get(f"{service}/{name}")
    if exact is not None:
        return exact
    return table.get(f"{service}/*", frozenset())


def may_call(
    caller: WorkloadName, method: str, table: Mapping[str, frozenset[str]] = CALLERS
) -> bool:
    allowed = allowed_callers(method, table)
    return bool(allowed & {"*", f"{caller.kind}/*", f"{caller.kind}/{caller.name}"})
