"""Fixtures shared by the integration tests (the session's servers are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.launcher import cluster, infra
from tessera.launcher.ports import free_port


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[cluster.NatsCluster]:
    """A 3-node JetStream cluster of the test's own, returned once it has a meta leader."""
    taken: set[int] = set()

    def port() -> int:
        chosen = free_port(exclude=taken)
        taken.add(chosen)
        return chosen

    layout = [cluster.NodePorts(port(), port(), port()) for _ in range(3)]
    running = cluster.start_nats_cluster(tmp_path, layout, timeout=30)
    try:
        yield running
    finally:
        for node in running.nodes:
            infra.stop(tmp_path, node.name)
