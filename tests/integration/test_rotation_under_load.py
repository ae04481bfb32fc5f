"""Rotation under load (RELIABILITY.md I9): a `tessera up` mesh whose workload
certificates live 10 seconds (and with them every client's NATS credential), and `tessera
creds rotate all` (the NATS servers' certificate, AppRole secret IDs, tool secrets, audit
signing keys) in the middle of W(N, T) of governed reference workflows.

Every process renews its certificate several times during the run (servers pick the new
one up at the next handshake, client channels are rebuilt, Envoy gets its new one over
SDS and the watched files); no call fails for it: every workflow succeeds, no client had
to retry anything, and every audit chain verifies with its signatures afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.cli.login import ensure_login
from tessera.launcher import state as state_file
from tests.chaos import workload
from tests.integration.test_mesh_up import tessera

pytestmark = pytest.mark.integration

CERT_TTL_S = 10
CLIENTS = int(os.environ.get("TESSERA_ROTATION_CLIENTS", "6"))
SECONDS = float(os.environ.get("TESSERA_ROTATION_SECONDS", "30"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    data_dir = tmp_path_factory.mktemp("rotation")
    env = {"TESSERA_CERT_TTL_S": str(CERT_TTL_S)}
    started = tessera("up", data_dir=data_dir, env=env, timeout_s=240)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        recorded = state_file.read(data_dir)
        assert recorded is not None
        yield data_dir, recorded.gateway
    finally:
        tessera("down", data_dir=data_dir)


def _renewals(data_dir: Path) -> dict[str, int]:
    """Certificates issued per component, from their JSON logs."""
    counts: dict[str, int] = {}
    for log in (data_dir / "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"workload_certificate_issued"' in line:
                counts[log.stem] = counts.get(log.stem, 0) + 1
    return counts


async def test_certificates_and_credentials_rotate_under_load_and_no_call_fails(
    mesh: tuple[Path, str],
) -> None:
    data_dir, gateway = mesh
    began = time.monotonic()

    async def rotate_mid_run() -> str:
        await asyncio.sleep(SECONDS / 3)  # the scenario's timeline, not a wait for an event
        done = await asyncio.to_thread(
            tessera, "creds", "rotate", "all", data_dir=data_dir, timeout_s=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    people = workload.People(
        ensure_login(data_dir, "requester").token, ensure_login(data_dir, "finance").token
    )
    load, rotated = await asyncio.gather(
        workload.run(gateway, people, CLIENTS, SECONDS), rotate_mid_run()
    )
    elapsed = time.monotonic() - began
    print(f"\nrotation under load: {json.dumps(dict(load.outcomes))} in {elapsed:.0f}s")
    assert load.started and load.outcomes["WORKFLOW_STATE_SUCCEEDED"] == len(load.started)
    assert load.errors == {}, load.errors
    assert not load.retried, load.retried  # no client call had to be retried
    assert "signing" in rotated
    assert "certificate/nats: reissued, reloaded by nats" in rotated, rotated
    # Every service renewed its certificate more than once during the run.
    renewals = _renewals(data_dir)
    for name in ("coordinator", "tool-proxy", "policy", "planner", "registry", "agent-billing"):
        assert renewals.get(name, 0) >= 3, renewals
    verified = await asyncio.to_thread(tessera, "audit", "verify", data_dir=data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "signatures checked" in verified.stdout
