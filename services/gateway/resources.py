"""From the registry and the edge policy to an xDS :class:`~services.gateway.ads.Snapshot`.

The resource shapes themselves come from :func:`tessera.launcher.gateway.build_resources`
(shared with the static bootstrap); this module only decides *which* agents and
endpoints exist and packs the result into typed protos.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

# Typed configs referenced by "@type" in the resources: importing them registers their
# descriptors so ParseDict can resolve them.
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2  # noqa: F401
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2  # noqa: F401
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_authn_pb2  # noqa: F401
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from services.gateway.ads import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot
from tessera.launcher.gateway import AgentEndpoint, Resources
from tessera.v1 import agent_pb2

__all__ = ["agent_endpoints", "to_snapshot"]

log = structlog.get_logger(__name__)


async def _resolve(endpoint: str) -> str | None:
    """``endpoint`` as ``ip:port`` (EDS takes addresses, not names); None if unusable."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        return None
    try:
        ipaddress.ip_address(host)
        return f"{host}:{port}"
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )
    except OSError:
        return None
    for _family, _type, _proto, _name, sockaddr in infos:
        return f"{sockaddr[0]}:{port}"
    return None


async def agent_endpoints(
    replicas: Iterable[agent_pb2.AgentDescriptor],
) -> dict[str, list[AgentEndpoint]]:
    """Agent name → its live replicas' endpoints (replicas without a usable one skipped)."""
    agents: dict[str, list[AgentEndpoint]] = {}
    for replica in replicas:
        address = await _resolve(replica.endpoint)
        if address is None:
            log.warning(
                "agent_endpoint_unusable",
                agent=replica.name,
                instance_id=replica.instance_id,
                endpoint=replica.endpoint,
            )
            continue
        agents.setdefault(replica.name, []).append(
            AgentEndpoint(instance_id=replica.instance_id, address=address, version=replica.version)
        )
    return agents


def _pack(
    items: Sequence[Mapping[str, Any]], message: type[Message], name_field: str
) -> dict[str, any_pb2.Any]:
    packed: dict[str, any_pb2.Any] = {}
    for item in items:
        proto = json_format.ParseDict(dict(item), message())
        resource = any_pb2.Any()
        resource.Pack(proto, deterministic=True)
        packed[str(item[name_field])] = resource
    return packed


def to_snapshot(resources: Resources) -> Snapshot:
    """Typed, packed resources. Raises ``json_format.ParseError`` on a malformed one."""
    return Snapshot(
        {
            LISTENER: _pack(resources.listeners, listener_pb2.Listener, "name"),
            ROUTE: _pack(resources.route_configs, route_pb2.RouteConfiguration, "name"),
            CLUSTER: _pack(resources.clusters, cluster_pb2.Cluster, "name"),
            ENDPOINT: _pack(
                resources.load_assignments, endpoint_pb2.ClusterLoadAssignment, "cluster_name"
            ),
            SECRET: _pack(resources.secrets, secret_pb2.Secret, "name"),
        }
    )
