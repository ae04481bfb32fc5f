"""Render the Envoy bootstrap from ``gateway/envoy.yaml`` and ``gateway/routes.yaml``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

HEALTH_SERVICE = "grpc.health.v1.Health"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_CLUSTER_RE = re.compile(r"[^a-z0-9_]")


@dataclass(frozen=True)
class Upstream:
    """One backend the gateway routes to, by fully qualified gRPC service name."""

    name: str
    address: str  # host:port
    grpc_services: tuple[str, ...]


def _cluster_name(name: str) -> str:
    return _CLUSTER_RE.sub("_", name.lower())


def _cluster(upstream: Upstream) -> dict[str, Any]:
    host, _, port = upstream.address.rpartition(":")
    return {
        "name": _cluster_name(upstream.name),
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": _cluster_name(upstream.name),
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": host, "port_value": int(port)}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _route(prefix: str, cluster: str, limits: dict[str, Any]) -> dict[str, Any]:
    action: dict[str, Any] = {
        "cluster": cluster,
        "timeout": str(limits["timeout"]),
        "max_stream_duration": {"grpc_timeout_header_max": str(limits["grpc_timeout_header_max"])},
    }
    if "idle_timeout" in limits:
        action["idle_timeout"] = str(limits["idle_timeout"])
    return {"match": {"prefix": prefix, "grpc": {}}, "route": action}


def render(
    gateway_dir: Path,
    *,
    listen_port: int,
    admin_port: int,
    access_log: Path,
    upstreams: Sequence[Upstream],
    health_upstream: str | None = None,
    node_id: str = "tessera-gateway",
) -> str:
    """The Envoy bootstrap YAML.

    Each of an upstream's ``grpc_services`` gets a route ``/<service>/``; gRPC health checks
    (``/grpc.health.v1.Health/``) go to ``health_upstream``. Unmatched paths get 404
    (gRPC UNIMPLEMENTED).
    """
    template = Template((gateway_dir / "envoy.yaml").read_text())
    settings = yaml.safe_load((gateway_dir / "routes.yaml").read_text()) or {}
    defaults = dict(settings.get("defaults", {}))
    overrides: dict[str, Any] = settings.get("services", {}) or {}
    routes: list[dict[str, Any]] = []
    for upstream in upstreams:
        for service in upstream.grpc_services:
            limits = {**defaults, **overrides.get(service, {})}
            routes.append(_route(f"/{service}/", _cluster_name(upstream.name), limits))
    if health_upstream is not None:
        limits = {**defaults, **settings.get("health", {})}
        routes.append(_route(f"/{HEALTH_SERVICE}/", _cluster_name(health_upstream), limits))
    if not routes:
        routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    return template.substitute(
        NODE_ID=json.dumps(node_id),
        ADMIN_PORT=admin_port,
        LISTEN_PORT=listen_port,
        ACCESS_LOG=json.dumps(str(access_log)),
        MAX_REQUEST_BYTES=int(settings.get("max_request_bytes", 4 * 1024 * 1024)),
        ROUTES=json.dumps(routes),
        CLUSTERS=json.dumps([_cluster(u) for u in upstreams]),
    )
