"""The chaos suite's mesh: one real `tessera up` (a 3-node NATS cluster in the long
tier) shared by the suite's modules, and the tier's sizes.

``TESSERA_CHAOS_KEEP_MESH=1`` leaves the mesh running after the suite (no `tessera down`),
so a failed run's workflows, events and logs can be read in place; stop it afterwards
with `tessera down --data-dir <the run's basetemp>/chaos0`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tessera.cli._local import nats_options
from tessera.cli.login import ensure_login
from tessera.launcher import processes
from tessera.launcher import state as state_file
from tests.chaos import workload
from tests.integration.test_mesh_up import tessera as run_cli

PROJECT = Path(__file__).resolve().parents[2]
REPORT_DIR = PROJECT / ".tessera" / "chaos"
LONG = os.environ.get("TESSERA_CHAOS_LONG") == "1"
"""`make chaos`: RELIABILITY.md's long tier."""
CLIENTS = int(os.environ.get("TESSERA_CHAOS_CLIENTS", "50" if LONG else "6"))
SECONDS = float(os.environ.get("TESSERA_CHAOS_SECONDS", "300" if LONG else "12"))
ADMISSION_LIMIT = 4 * CLIENTS
"""The coordinators' admission limit on this mesh: 4x the steady load's workflows."""


@dataclass
class Mesh:
    data_dir: Path
    gateway: str
    nats_url: str
    namespace: str

    def people(self) -> workload.People:
        """The requester's and a finance approver's logins (fresh for the next hour)."""
        return workload.People(
            ensure_login(self.data_dir, "requester").token,
            ensure_login(self.data_dir, "finance").token,
        )

    @property
    def nats_options(self) -> dict[str, Any]:
        """TLS as the operator: the mesh's NATS admits only certificates of the mesh CA."""
        return nats_options(self.data_dir)


def tessera(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The `tessera` command line, as an operator runs it, with this mesh's limit."""
    limit = {"TESSERA_COORDINATOR_MAX_ACTIVE_WORKFLOWS": str(ADMISSION_LIMIT)}
    return run_cli(*args, data_dir=data_dir, env=limit, timeout_s=240)


@pytest.fixture(scope="package")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("chaos")
    up = ["up", "--nats-cluster", "3"] if LONG else ["up"]
    started = tessera(*up, data_dir=data_dir)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        recorded = state_file.read(data_dir)
        assert recorded is not None
        nats = [c.address for c in recorded.components if c.name.startswith("nats")]
        coordinator = processes.read_record(data_dir, "coordinator")
        assert coordinator is not None
        yield Mesh(
            data_dir,
            recorded.gateway,
            ",".join(a for a in nats if a.startswith("nats://")),
            coordinator.env.get("TESSERA_NAMESPACE", "tessera"),
        )
    finally:
        if os.environ.get("TESSERA_CHAOS_KEEP_MESH") != "1":
            tessera("down", data_dir=data_dir)
