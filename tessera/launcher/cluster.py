"""A local NATS JetStream cluster: N nats-servers on loopback, routed to each other.

Each node is :func:`tessera.launcher.infra.start_nats` with a cluster block (its own store
directory, ``sync_interval: always``), named ``n1``..``nN`` inside NATS and
``nats-n1``..``nats-nN`` as a process (PID file, log, state.json). A cluster is ready
once every node answers its JetStream health check and all of them agree on a JetStream
meta leader, so streams with replicas can be created at once.

Used by ``tessera up --nats-cluster N`` and by the tests that take nodes away.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tessera.launcher import infra, processes

__all__ = [
    "CLUSTER_NAME",
    "MAX_NODES",
    "MIN_NODES",
    "NatsCluster",
    "NodePorts",
    "meta_leader",
    "node_name",
    "replicas_for",
    "server_name",
    "start_nats_cluster",
    "start_node",
    "wait_cluster_ready",
]

log = structlog.get_logger(__name__)

CLUSTER_NAME = "tessera"
MIN_NODES = 3
MAX_NODES = 5


@dataclass(frozen=True)
class NodePorts:
    """The three loopback ports of one node."""

    client: int
    monitor: int
    route: int


def node_name(index: int) -> str:
    """Process/component name of node ``index`` (0-based): ``nats-n1``…"""
    return f"nats-n{index + 1}"


def server_name(index: int) -> str:
    """``server_name`` of node ``index`` inside NATS (0-based): ``n1``…"""
    return f"n{index + 1}"


def replicas_for(size: int) -> int:
    """Replicas of every stream and bucket on a cluster of ``size`` nodes: 3 (survives the
    loss of one node) once there are three, never more (R5 doubles the write cost)."""
    return max(1, min(size, 3))


@dataclass(frozen=True)
class NatsCluster:
    """A running cluster; ``url`` is what clients get (every node, comma-separated)."""

    nodes: tuple[infra.NatsServer, ...]
    ports: tuple[NodePorts, ...]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def replicas(self) -> int:
        return replicas_for(len(self.nodes))

    def node(self, name: str) -> infra.NatsServer:
        """The node named ``name`` (``nats-n2``) or ``server_name`` (``n2``)."""
        for index, node in enumerate(self.nodes):
            if name in (node.name, server_name(index)):
                return node
        raise KeyError(name)


def _membership(ports: Sequence[NodePorts], index: int) -> infra.ClusterMembership:
    return infra.ClusterMembership(
        cluster_name=CLUSTER_NAME,
        port=ports[index].route,
        peer_ports=tuple(p.route for i, p in enumerate(ports) if i != index),
    )


def start_node(
    data_dir: Path,
    ports: Sequence[NodePorts],
    index: int,
    *,
    wait: bool = True,
    security: infra.NatsSecurity | None = None,
) -> infra.NatsServer:
    """Start (or restart, on its existing store) node ``index`` of the cluster laid out by
    ``ports``. With ``wait``, returns once its JetStream health check passes."""
    return infra.start_nats(
        data_dir,
        port=ports[index].client,
        monitor_port=ports[index].monitor,
        name=node_name(index),
        server_name=server_name(index),
        cluster=_membership(ports, index),
        security=security,
        wait=wait,
    )


def start_nats_cluster(
    data_dir: Path,
    ports: Sequence[NodePorts],
    *,
    wait: bool = True,
    timeout: float = 30.0,
) -> NatsCluster:
    """Start one node per entry of ``ports`` (at least :data:`MIN_NODES`).

    Without ``wait`` the processes are only spawned (PID files written); call
    :func:`wait_cluster_ready` before using the cluster. Raises
    :class:`~tessera.launcher.infra.StartFailed` naming the first node that failed.
    """
    if not MIN_NODES <= len(ports) <= MAX_NODES:
        raise ValueError(f"a NATS cluster has {MIN_NODES} to {MAX_NODES} nodes, not {len(ports)}")
    nodes = tuple(start_node(data_dir, ports, i, wait=False) for i in range(len(ports)))
    cluster = NatsCluster(nodes=nodes, ports=tuple(ports))
    if wait:
        wait_cluster_ready(cluster.nodes, timeout=timeout)
    return cluster


def _get_json(url: str, *, timeout: float = 1.0) -> dict[str, Any] | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            data = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def meta_leader(node: infra.NatsServer) -> str | None:
    """The JetStream meta leader ``node`` knows of (a server name), or None."""
    jsz = _get_json(f"{node.monitor_url}/jsz")
    meta = (jsz or {}).get("meta_cluster") or {}
    leader = meta.get("leader")
    return str(leader) if leader else None


def wait_cluster_ready(nodes: Sequence[infra.NatsServer], *, timeout: float = 30.0) -> str:
    """Block until every node in ``nodes`` passes its JetStream health check and all of
    them name the same meta leader; returns the leader's server name.

    Pass only the nodes expected to be up (e.g. two of three after a kill).
    Raises :class:`~tessera.launcher.infra.StartFailed` at ``timeout``.
    """
    deadline = time.monotonic() + timeout
    infra.wait_ready(nodes, timeout=timeout)
    delay = 0.05
    while True:
        for node in nodes:
            if not processes.pid_exists(node.pid):
                raise infra.StartFailed(node.name, "exited", node.log_path)
        leaders = {meta_leader(node) for node in nodes}
        if len(leaders) == 1 and None not in leaders:
            leader = leaders.pop()
            assert leader is not None
            log.info("nats_cluster_ready", nodes=len(nodes), meta_leader=leader)
            return leader
        if time.monotonic() >= deadline:
            seen = ", ".join(sorted(map(str, leaders)))
            raise infra.StartFailed(
                "nats cluster",
                f"no agreed JetStream meta leader after {timeout:.0f}s (saw {seen})",
                nodes[0].log_path,
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
