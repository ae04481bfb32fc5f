"""A 5x burst (RELIABILITY.md, Load): five times the steady load's clients at once. What
the admission limit cannot take is refused with RESOURCE_EXHAUSTED (MESH_BUSY, with a
RetryInfo) instead of queued without bound; everything admitted completes, nothing is
lost, no effect repeats, and the backlog drains."""

from __future__ import annotations

import os

from tests.chaos import workload
from tests.chaos.conftest import ADMISSION_LIMIT, CLIENTS, LONG, Mesh
from tests.end_of_run import check_effects_once, check_executions, read_stored

BURST_CLIENTS = 5 * CLIENTS
BURST_SECONDS = float(os.environ.get("TESSERA_BURST_SECONDS", "60" if LONG else "10"))


async def test_a_5x_burst_is_shed_at_admission_and_loses_nothing(mesh: Mesh) -> None:
    assert BURST_CLIENTS > ADMISSION_LIMIT, "the burst must exceed what the mesh admits"
    load = await workload.run(mesh.gateway, mesh.people(), BURST_CLIENTS, BURST_SECONDS)
    print(
        f"\nburst W({BURST_CLIENTS}, {BURST_SECONDS:g}s) over a limit of {ADMISSION_LIMIT}: "
        f"{len(load.started)} admitted, {load.refused} starts refused and retried later, "
        f"slowest {max(load.latencies.values()):.2f}s"
    )
    assert load.refused > 0, "nothing was refused: the burst never reached the limit"
    assert set(load.outcomes) == {"WORKFLOW_STATE_SUCCEEDED"}, (load.outcomes, load.errors)
    # Nothing lost: every admitted workflow is terminal (succeeded) in JetStream, which
    # also means the backlog the burst built has drained.
    client = workload.Client(mesh.gateway, mesh.people())
    try:
        states = {n: (await client.get(n)).state for n in load.started}
    finally:
        await client.close()
    assert set(states.values()) == {workload.WS.WORKFLOW_STATE_SUCCEEDED}
    ids = {n.split("/")[1] for n in load.started}
    refunding = {n.split("/")[1] for n, k in load.started.items() if k.endswith("_refund")}
    stored = await read_stored(mesh.nats_url, mesh.namespace, ids, nats_options=mesh.nats_options)
    check_executions(stored, unfinished_allowed=0)
    check_effects_once(stored, refunding=refunding, succeeded=ids)
