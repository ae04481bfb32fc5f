"""The gateway's Envoy configuration: one builder for the bootstrap and every resource.

``gateway/envoy.yaml`` is the bootstrap: node, admin, and an ADS connection to the gateway
control plane (``services/gateway``). The control plane calls :func:`build_resources` to
turn ``gateway/routes.yaml`` (limits, timeouts, rate limits, transcoding), the public
services and the live agent replicas into Envoy v3 resources (as JSON-shaped dicts), and
serves them over ADS. :func:`render` returns that bootstrap; without an ``xds_address`` it
instead inlines the same resources in ``static_resources`` (for an Envoy that runs without
a control plane, as some tests do). Both paths share every listener, route and cluster.

Agent routing: each agent name ``N`` in the registry gets a cluster ``agent-N`` (one
endpoint per live replica) reached by gRPC calls to ``/tessera.v1.AgentService/*`` (and
``/grpc.health.v1.Health/*``) that carry the header ``x-tessera-agent: N``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import structlog
import yaml

from tessera.identity.names import WorkloadName
from tessera.launcher.descriptors import described_services
from tessera.launcher.edge_auth import (
    CONSOLE_PATH,
    CONSOLE_SERVICE,
    SESSION_COOKIE,
    HumanAuth,
    identity_filters,
    security_response_headers,
)
from tessera.runtime.principal import SUBJECT_HEADER

log = structlog.get_logger(__name__)

__all__ = [
    "AGENT_SERVICE",
    "CONTROL_PLANE_MODULE",
    "COORDINATOR_A2A_SERVICES",
    "HEALTH_SERVICE",
    "LISTENER_NAME",
    "MCP_PUBLIC_METHODS",
    "POLICY_PUBLIC_METHODS",
    "REGISTRY_PUBLIC_METHODS",
    "ROUTE_CONFIG_NAME",
    "SESSION_COOKIE",
    "AgentEndpoint",
    "HumanAuth",
    "Resources",
    "Upstream",
    "agent_cluster_name",
    "build_resources",
    "cluster_name",
    "load_edge_config",
    "render",
]

CONTROL_PLANE_MODULE = "services.gateway"
HEALTH_SERVICE = "grpc.health.v1.Health"
AGENT_SERVICE = "tessera.v1.AgentService"
LISTENER_NAME = "tessera_ingress"
ROUTE_CONFIG_NAME = "tessera_routes"
AGENT_HEADER = "x-tessera-agent"
COORDINATOR_A2A_SERVICES = ("lf.a2a.v1.A2AService", "tessera.v1.AgentCardService")
"""Served by the coordinator beside CoordinatorService: the A2A face (the a2a-sdk
package's contract) and its agent cards."""

_T = "type.googleapis.com/"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_FILE_LOG = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
_HEALTH_FILTER = "envoy.extensions.filters.http.health_check.v3.HealthCheck"
_RATE_LIMIT = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_BUFFER = "envoy.extensions.filters.http.buffer.v3.Buffer"
_TRANSCODER = "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
_HCM_FILTER = "envoy.filters.network.http_connection_manager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_ADS_SOURCE: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
_CLUSTER_RE = re.compile(r"[^a-z0-9_]")
_ALL = {"runtime_key": "", "default_value": {"numerator": 100, "denominator": "HUNDRED"}}

_ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",  # as routed: the gRPC method for transcoded HTTP/JSON calls
    "original_path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",  # as the caller sent it
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS(NUMBER)%",
    "response_flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "traceparent": "%REQ(TRACEPARENT)%",
    "subject": "%REQ(X-TESSERA-SUBJECT)%",  # the verified person (never their token)
    "agent": "%REQ(X-TESSERA-AGENT)%",
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
}


@dataclass(frozen=True)
class Upstream:
    """One backend the gateway routes to, by fully qualified gRPC service name."""

    name: str
    address: str  # host:port
    grpc_services: tuple[str, ...]
    methods: tuple[str, ...] = ()
    """When set, only these ``package.Service/Method`` are routed to it (a service whose
    other methods are for workloads only, e.g. the registry's); else every method of
    ``grpc_services``."""


REGISTRY_PUBLIC_METHODS = (
    "tessera.v1.RegistryService/FreezeAgent",
    "tessera.v1.RegistryService/UnfreezeAgent",
    "tessera.v1.RegistryService/ListFrozenAgents",
    "tessera.v1.RegistryService/ListAgents",
)
"""The registry's methods people reach through the front door (the kill switch for one
agent, and the live registry for the console); registering stays for agents, over their
own mTLS connection."""

MCP_SERVICE = "tessera.v1.McpService"
MCP_PATH = "/mcp"
MCP_PUBLIC_METHODS = (
    f"{MCP_SERVICE}/HandleMcpMessage",
    f"{MCP_SERVICE}/DecideToolCallApproval",
)
"""The tool proxy's methods people reach through the front door: its MCP face (``POST
/mcp``, transcoded with the raw body) and their decisions on each other's tool calls;
``ToolProxyService`` stays for agents, over their own mTLS connections."""

POLICY_PUBLIC_METHODS = ("tessera.v1.PolicyService/GetPolicySet",)
"""The policy service's method people reach through the front door: the served set's
version and coverage (decisions and reloads stay inside the mesh)."""


@dataclass(frozen=True)
class AgentEndpoint:
    """One live agent replica: where it serves (an IP ``host:port``) and who it is."""

    instance_id: str
    address: str
    version: str = ""


@dataclass(frozen=True)
class Resources:
    """Envoy v3 resources as JSON-shaped dicts (``@type`` on every typed config)."""

    listeners: list[dict[str, Any]] = field(default_factory=list)
    route_configs: list[dict[str, Any]] = field(default_factory=list)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    load_assignments: list[dict[str, Any]] = field(default_factory=list)
    secrets: list[dict[str, Any]] = field(default_factory=list)


def cluster_name(name: str) -> str:
    """Cluster of a public service (``tool-proxy`` → ``tool_proxy``)."""
    return _CLUSTER_RE.sub("_", name.lower())


def agent_cluster_name(agent: str) -> str:
    """Cluster of an agent's replicas (``billing`` → ``agent-billing``)."""
    return f"agent-{agent}"


def load_edge_config(path: Path) -> dict[str, Any]:
    """``gateway/routes.yaml`` as a mapping (empty file: all defaults)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _socket(address: str) -> dict[str, Any]:
    host, port = _split(address)
    return {"socket_address": {"address": host, "port_value": port}}


def _http2_options() -> dict[str, Any]:
    return {
        _HTTP_OPTIONS: {
            "@type": _T + _HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _lb_endpoint(endpoint: AgentEndpoint) -> dict[str, Any]:
    return {
        "endpoint": {"address": _socket(endpoint.address), "hostname": endpoint.instance_id},
        "health_status": "HEALTHY",
        "metadata": {
            "filter_metadata": {
                "tessera": {"instance_id": endpoint.instance_id, "version": endpoint.version}
            }
        },
    }


def _load_assignment(name: str, endpoints: Sequence[AgentEndpoint]) -> dict[str, Any]:
    ordered = sorted(endpoints, key=lambda e: (e.instance_id, e.address))
    lb_endpoints = [_lb_endpoint(e) for e in ordered]
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}] if ordered else []}


def _grpc_health_check(service: str, interval: str) -> dict[str, Any]:
    return {
        "timeout": "1s",
        "interval": interval,
        "no_traffic_interval": interval,  # default 60 s would make /healthz lag
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {"service_name": service},
    }


@dataclass(frozen=True)
class UpstreamTls:
    """mTLS from Envoy to the services: Envoy's certificate and the mesh CA arrive over
    SDS (on the ADS stream) as the secrets named here; each upstream must present the
    certificate of its own identity (its component name)."""

    trust_domain: str
    certificate_secret: str = "gateway-certificate"
    ca_secret: str = "mesh-ca"


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def _tls_socket(
    peer: WorkloadName, certificate: dict[str, Any], ca: dict[str, Any]
) -> dict[str, Any]:
    """An upstream mTLS transport socket: our certificate and the CA from the given SDS
    sources, the server pinned to ``peer``'s SPIFFE ID (and asked for by its DNS name)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _T + _UPSTREAM_TLS,
            "sni": peer.dns_name,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [certificate],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": peer.spiffe_id}}
                        ]
                    },
                    "validation_context_sds_secret_config": ca,
                },
            },
        },
    }


def _upstream_tls(identity: str, tls: UpstreamTls) -> dict[str, Any]:
    return _tls_socket(
        WorkloadName.of(identity, tls.trust_domain),
        _sds(tls.certificate_secret),
        _sds(tls.ca_secret),
    )


def tls_secrets(tls: UpstreamTls, *, certificate: str, private_key: str, ca: str) -> list[Any]:
    """The SDS secrets ``UpstreamTls`` refers to (inline PEM; only ever sent over mTLS)."""
    return [
        {
            "name": tls.certificate_secret,
            "tls_certificate": {
                "certificate_chain": {"inline_string": certificate},
                "private_key": {"inline_string": private_key},
            },
        },
        {"name": tls.ca_secret, "validation_context": {"trusted_ca": {"inline_string": ca}}},
    ]


def _upstream_cluster(
    upstream: Upstream, health_check: dict[str, Any] | None, tls: UpstreamTls | None = None
) -> dict[str, Any]:
    name = cluster_name(upstream.name)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _http2_options(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(upstream.address)}}]}],
        },
    }
    if health_check is not None:
        cluster["health_checks"] = [health_check]
    if tls is not None:
        cluster["transport_socket"] = _upstream_tls(upstream.name, tls)
    return cluster


def _agent_cluster(
    agent: str, endpoints: Sequence[AgentEndpoint], *, dynamic: bool
) -> dict[str, Any]:
    name = agent_cluster_name(agent)
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _http2_options(),
        # Passive health on top of the registry's heartbeats: eject a replica that keeps
        # failing until it recovers or leaves the registry.
        "outlier_detection": {
            "consecutive_5xx": 5,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
    }
    if dynamic:
        cluster["type"] = "EDS"
        cluster["eds_cluster_config"] = {"eds_config": _ADS_SOURCE, "service_name": name}
    else:
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = _load_assignment(name, endpoints)
    return cluster


def _route_action(cluster: str, limits: Mapping[str, Any]) -> dict[str, Any]:
    action: dict[str, Any] = {
        "cluster": cluster,
        "timeout": str(limits.get("timeout", "30s")),
        "max_stream_duration": {
            "grpc_timeout_header_max": str(limits.get("grpc_timeout_header_max", "300s"))
        },
    }
    if "idle_timeout" in limits:
        action["idle_timeout"] = str(limits["idle_timeout"])
    return action


def _routes(
    edge: Mapping[str, Any],
    upstreams: Sequence[Upstream],
    health_upstream: str | None,
    agents: Sequence[str],
) -> list[dict[str, Any]]:
    defaults = dict(edge.get("defaults") or {})
    services: Mapping[str, Any] = edge.get("services") or {}
    methods: Mapping[str, Any] = edge.get("methods") or {}
    agent_cfg = {**defaults, **(edge.get("agents") or {})}
    header = str(agent_cfg.pop("header", AGENT_HEADER))
    health_limits = {**defaults, **(edge.get("health") or {})}
    routes: list[dict[str, Any]] = []
    if any(CONSOLE_SERVICE in u.grpc_services for u in upstreams):
        # The console's address is /console/ (its entry page, the file index.html).
        for path in ("/", CONSOLE_PATH.rstrip("/"), CONSOLE_PATH):
            routes.append(
                {
                    "match": {"path": path},
                    "redirect": {"path_redirect": CONSOLE_PATH + "index.html"},
                }
            )
    if any(MCP_SERVICE in u.grpc_services for u in upstreams):
        # MCP's streamable HTTP without a server-initiated stream or sessions: only POST
        # (transcoded to HandleMcpMessage); a GET (the SSE stream) or DELETE is 405.
        routes.append(
            {
                "match": {
                    "path": MCP_PATH,
                    "headers": [
                        {
                            "name": ":method",
                            "string_match": {"exact": "POST"},
                            "invert_match": True,
                        }
                    ],
                },
                "direct_response": {"status": 405},
                "response_headers_to_add": [
                    {
                        "header": {"key": "allow", "value": "POST"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        )
    for agent in agents:
        by_name = [{"name": header, "string_match": {"exact": agent}}]
        cluster = agent_cluster_name(agent)
        routes.append(
            {
                "match": {"prefix": f"/{AGENT_SERVICE}/", "grpc": {}, "headers": by_name},
                "route": _route_action(cluster, agent_cfg),
            }
        )
        routes.append(
            {
                "match": {"prefix": f"/{HEALTH_SERVICE}/", "grpc": {}, "headers": by_name},
                "route": _route_action(cluster, health_limits),
            }
        )
    for upstream in upstreams:
        cluster = cluster_name(upstream.name)
        for method in upstream.methods:
            service = method.partition("/")[0]
            limits = {**defaults, **(services.get(service) or {}), **(methods.get(method) or {})}
            routes.append(
                {
                    "match": {"path": f"/{method}", "grpc": {}},
                    "route": _route_action(cluster, limits),
                }
            )
        for service in () if upstream.methods else upstream.grpc_services:
            limits = {**defaults, **(services.get(service) or {})}
            for method, override in methods.items():
                if method.startswith(f"{service}/"):
                    routes.append(
                        {
                            "match": {"path": f"/{method}", "grpc": {}},
                            "route": _route_action(cluster, {**limits, **(override or {})}),
                        }
                    )
            routes.append(
                {
                    "match": {"prefix": f"/{service}/", "grpc": {}},
                    "route": _route_action(cluster, limits),
                }
            )
    if health_upstream is not None:
        routes.append(
            {
                "match": {"prefix": f"/{HEALTH_SERVICE}/", "grpc": {}},
                "route": _route_action(cluster_name(health_upstream), health_limits),
            }
        )
    if not routes:
        routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    return routes


def _bucket(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "max_tokens": int(spec["max_tokens"]),
        "tokens_per_fill": int(spec.get("tokens_per_fill", spec["max_tokens"])),
        "fill_interval": str(spec.get("fill_interval", "1s")),
    }


def _http_filters(
    edge: Mapping[str, Any],
    *,
    max_bytes: int,
    health_cluster: str | None,
    descriptor_set: Path | None,
    human_auth: HumanAuth | None,
) -> list[dict[str, Any]]:
    healthz = edge.get("healthz") or {}
    health: dict[str, Any] = {
        "@type": _T + _HEALTH_FILTER,
        "pass_through_mode": False,
        "headers": [{"name": ":path", "string_match": {"exact": healthz.get("path", "/healthz")}}],
    }
    if health_cluster is not None:
        health["cluster_min_healthy_percentages"] = {health_cluster: {"value": 100.0}}
    filters: list[dict[str, Any]] = [
        {"name": "envoy.filters.http.health_check", "typed_config": health}
    ]
    if human_auth is not None:
        filters += identity_filters(human_auth, health_service=HEALTH_SERVICE)
    limit = edge.get("rate_limit")
    if limit:
        # Keyed on the verified subject (set by jwt_authn above), never on a header the
        # caller chooses: one bucket per person.
        by_caller = {"request_headers": {"header_name": SUBJECT_HEADER, "descriptor_key": "caller"}}
        # No value: a wildcard descriptor, one bucket per distinct caller.
        per_caller = {"entries": [{"key": "caller"}], "token_bucket": _bucket(limit["per_caller"])}
        filters.append(
            {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": _T + _RATE_LIMIT,
                    "stat_prefix": "local_rate_limit",
                    "token_bucket": _bucket(limit["anonymous"]),
                    "filter_enabled": _ALL,
                    "filter_enforced": _ALL,
                    "descriptors": [per_caller],
                    "rate_limits": [{"actions": [by_caller]}],
                    "max_dynamic_descriptors": int(limit.get("max_callers", 10000)),
                    "always_consume_default_token_bucket": False,
                    "local_rate_limit_per_downstream_connection": False,
                    "rate_limited_as_resource_exhausted": True,
                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                },
            }
        )
    # Request size limit: larger requests are refused with 413 before they reach a
    # service. Holds request bodies only, so unary and server-streaming RPCs work.
    filters.append(
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {"@type": _T + _BUFFER, "max_request_bytes": max_bytes},
        }
    )
    transcoder = edge.get("transcoder") or {}
    services = described_services(descriptor_set, transcoder.get("services") or ())
    if descriptor_set is not None and services:
        filters.append(
            {
                "name": "envoy.filters.http.grpc_json_transcoder",
                "typed_config": {
                    "@type": _T + _TRANSCODER,
                    "proto_descriptor": str(descriptor_set),
                    "services": services,
                    "print_options": {
                        "add_whitespace": False,
                        "always_print_primitive_fields": False,
                        "preserve_proto_field_names": False,
                        "stream_newline_delimited": True,
                    },
                    # Errors become a JSON google.rpc.Status with its details.
                    "convert_grpc_status": True,
                    "case_insensitive_enum_parsing": True,
                    "request_validation_options": {"reject_unknown_query_parameters": True},
                },
            }
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _T + _ROUTER}})
    return filters


def build_resources(
    edge: Mapping[str, Any],
    *,
    listen: str,
    access_log: Path | str,
    upstreams: Sequence[Upstream],
    health_upstream: str | None = None,
    agents: Mapping[str, Sequence[AgentEndpoint]] | None = None,
    descriptor_set: Path | None = None,
    dynamic: bool = True,
    tls: UpstreamTls | None = None,
    human_auth: HumanAuth | None = None,
) -> Resources:
    """Every Envoy resource of the gateway.

    ``edge`` is ``gateway/routes.yaml``; ``listen`` the listener's ``host:port``;
    ``agents`` maps agent names to their live replicas (a name with no replica keeps its
    cluster, empty). ``dynamic``: routes by RDS and agent endpoints by EDS, both over ADS
    (else inline). Without ``descriptor_set`` there is no HTTP/JSON transcoding. Without
    ``human_auth`` nobody is authenticated at the front door (local debugging only).
    """
    agents = agents or {}
    names = sorted(agents)
    max_bytes = int(edge.get("max_request_bytes", 4 * 1024 * 1024))
    healthz = edge.get("healthz") or {}
    health_check: dict[str, Any] | None = None
    health_cluster: str | None = None
    if health_upstream is not None:
        health_cluster = cluster_name(health_upstream)
        target = next((u for u in upstreams if u.name == health_upstream), None)
        service = target.grpc_services[0] if target and target.grpc_services else ""
        health_check = _grpc_health_check(service, str(healthz.get("interval", "1s")))
    route_config = {
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [
            {
                "name": "tessera",
                "domains": ["*"],
                "routes": _routes(edge, upstreams, health_upstream, names),
                "response_headers_to_add": security_response_headers(),
            }
        ],
    }
    hcm: dict[str, Any] = {
        "@type": _T + _HCM,
        "stat_prefix": "grpc_ingress",
        # HTTP/1.1 for JSON callers and curl, h2c for gRPC callers, on one port.
        "codec_type": "AUTO",
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "max_request_headers_kb": 64,
        "request_timeout": "0s",
        "stream_idle_timeout": "300s",
        "normalize_path": True,
        "merge_slashes": True,
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _T + _FILE_LOG,
                    "path": str(access_log),
                    "log_format": {"json_format": _ACCESS_LOG_FORMAT},
                },
            }
        ],
        "http_filters": _http_filters(
            edge,
            max_bytes=max_bytes,
            health_cluster=health_cluster,
            descriptor_set=descriptor_set,
            human_auth=human_auth,
        ),
    }
    if dynamic:
        hcm["rds"] = {"route_config_name": ROUTE_CONFIG_NAME, "config_source": _ADS_SOURCE}
    else:
        hcm["route_config"] = route_config
    listener = {
        "name": LISTENER_NAME,
        "address": _socket(listen),
        "per_connection_buffer_limit_bytes": max_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    clusters = [
        _upstream_cluster(u, health_check if u.name == health_upstream else None, tls)
        for u in upstreams
    ]
    clusters += [_agent_cluster(n, agents[n], dynamic=dynamic) for n in names]
    return Resources(
        listeners=[listener],
        route_configs=[route_config] if dynamic else [],
        clusters=clusters,
        load_assignments=(
            [_load_assignment(agent_cluster_name(n), agents[n]) for n in names] if dynamic else []
        ),
    )


@dataclass(frozen=True)
class XdsTls:
    """mTLS on Envoy's ADS connection: its certificate and the mesh CA from the SDS files
    the control plane keeps in ``cert_dir`` (services/gateway/envoy_identity.py), the
    control plane verified by its SPIFFE ID."""

    cert_dir: Path
    trust_domain: str
    control_plane: str = "gateway-control-plane"


def _file_sds(name: str, path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": str(path),
                "watched_directory": {"path": str(path.parent)},
            },
            "resource_api_version": "V3",
        },
    }


def _xds_transport_socket(tls: XdsTls) -> dict[str, Any]:
    return _tls_socket(
        WorkloadName.of(tls.control_plane, tls.trust_domain),
        _file_sds("xds-certificate", tls.cert_dir / "xds-certificate.yaml"),
        _file_sds("xds-ca", tls.cert_dir / "xds-ca.yaml"),
    )


def render(
    gateway_dir: Path,
    *,
    listen_port: int,
    admin_port: int,
    access_log: Path,
    upstreams: Sequence[Upstream] = (),
    health_upstream: str | None = None,
    node_id: str = "tessera-gateway",
    xds_address: str | None = None,
    descriptor_set: Path | None = None,
    xds_tls: XdsTls | None = None,
    human_auth: HumanAuth | None = None,
) -> str:
    """The Envoy bootstrap YAML.

    With ``xds_address`` (the control plane's ``host:port``) it is ``gateway/envoy.yaml``
    as is: everything else arrives over ADS, and ``listen_port``, ``upstreams``... are the
    control plane's business. Without it, the listener on ``listen_port`` and the clusters
    of ``upstreams`` are inlined (static; no agents): each upstream's ``grpc_services``
    get a route ``/<service>/``, gRPC health checks go to ``health_upstream``, unmatched
    paths get 404 (gRPC UNIMPLEMENTED).
    """
    xds_host, xds_port = _split(xds_address) if xds_address else ("127.0.0.1", 1)
    text = Template((gateway_dir / "envoy.yaml").read_text()).substitute(
        NODE_ID=json.dumps(node_id),
        ADMIN_PORT=admin_port,
        XDS_HOST=json.dumps(xds_host),
        XDS_PORT=xds_port,
    )
    if xds_address is not None:
        if xds_tls is None:
            return text
        bootstrap = yaml.safe_load(text)
        for cluster in bootstrap["static_resources"]["clusters"]:
            if cluster["name"] == "xds":
                cluster["transport_socket"] = _xds_transport_socket(xds_tls)
        return yaml.safe_dump(bootstrap, sort_keys=False)
    resources = build_resources(
        load_edge_config(gateway_dir / "routes.yaml"),
        listen=f"127.0.0.1:{listen_port}",
        access_log=access_log,
        upstreams=upstreams,
        health_upstream=health_upstream,
        descriptor_set=descriptor_set,
        dynamic=False,
        human_auth=human_auth,
    )
    bootstrap = yaml.safe_load(text)
    del bootstrap["dynamic_resources"]
    bootstrap["static_resources"] = {
        "listeners": resources.listeners,
        "clusters": resources.clusters,
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)
