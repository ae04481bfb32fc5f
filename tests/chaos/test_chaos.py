"""The chaos suite: W(N, T) of governed reference workflows on a real `tessera up` mesh
while one process after another is killed with SIGKILL and restarted a second later with
the same command (`tessera restart`), as an operator's supervisor would.

After each fault, RELIABILITY.md's end-of-run checks, read from what the mesh stored:
C1 some workflow completed, C2 every started workflow is terminal, C3 none failed
(transient faults delay, never fail), C5 the slowest is reported, C6 every tool
execution has its allow record and every audit chain verifies, C7 no side effect twice
(per idempotency key and per workflow), C8 no side effect on a workflow that did not
succeed. C4 (throughput ≥ 90 % of the fault-free run) is reported, not asserted: on two
shared cores a short window's rate is noise. The time from the kill to the next workflow
ending (the stall) is reported too.

Bounded (in `make test`): every service kind, an agent, the control plane, Envoy and OpenBao,
W(6, 12 s) each. Long (`make chaos`, marked slow): W(50, 5 min) per fault on a 3-node
NATS cluster, one node killed as well. Both write their table to `.tessera/chaos/`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tessera.launcher import processes
from tessera.launcher import state as state_file
from tessera.launcher.mesh import probe_identity, wait_service
from tessera.launcher.ports import free_port
from tessera.launcher.restart import restart
from tests.chaos import workload
from tests.chaos.conftest import CLIENTS, LONG, PROJECT, REPORT_DIR, SECONDS, Mesh
from tests.end_of_run import check_effects_once, check_executions, read_stored

DOWN_S = 1.0
"""How long a killed process stays down before it is restarted."""

# Every process kind `tessera up` runs, by its component name; the agents stand for
# their kind (billing moves money, synthesis sends mail, triage starts every ticket).
FAULTS = (
    "coordinator",
    "tool-proxy",
    "agent-billing",
    "policy",
    "planner",
    "registry",  # agents keep their entries through it: the lease outlasts the restart
    "agent-synthesis",
    "agent-triage",
    "gateway-control-plane",
    "envoy",
    "openbao",  # raft storage on disk: it comes back sealed and `tessera restart` unseals it
)
LONG_FAULTS = (*FAULTS, "nats-n2")  # a NATS node of three (not the seed), restarted later


@pytest.fixture(scope="module")
def table() -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    yield rows
    if rows:
        write_report(rows)


def write_report(rows: list[dict[str, Any]]) -> None:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    tier = "long" if LONG else "bounded"
    (REPORT_DIR / f"{tier}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"# Chaos suite ({tier}): W({CLIENTS}, {SECONDS:g}s) per fault, kill -9, "
        f"restart after {DOWN_S:g}s",
        "",
        "| fault | workflows | succeeded | C1 | C2 | C3 | C5 slowest (s) | C6 executions "
        "| C7 | C8 | stall after kill (s) | restart to serving (s) | rate vs no fault |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['fault']} | {r['workflows']} | {r['succeeded']} | {r['C1']} | {r['C2']} "
            f"| {r['C3']} | {r['slowest_s']:.2f} | {r['executions']} | {r['C7']} | {r['C8']} "
            f"| {r['stall_s']:.2f} | {r['restart_s']:.2f} | {r['rate_ratio']:.2f} |"
        )
    (REPORT_DIR / f"{tier}.md").write_text("\n".join(lines) + "\n")


class Baseline:
    rate: float = 0.0


async def _checks(mesh: Mesh, load: workload.Load, fault: str) -> dict[str, Any]:
    """C1-C3 and C5-C8; raises on the first that fails, after printing the row."""
    names = list(load.started)
    client = workload.Client(mesh.gateway, mesh.people())
    try:
        states = {n: (await client.get(n)).state for n in names}
    finally:
        await client.close()
    ids = {n.split("/")[1] for n in names}
    succeeded = {
        n.split("/")[1] for n, s in states.items() if s == workload.WS.WORKFLOW_STATE_SUCCEEDED
    }
    refunding = {n.split("/")[1] for n, kind in load.started.items() if kind.endswith("_refund")}
    stored = await read_stored(mesh.nats_url, mesh.namespace, ids, nats_options=mesh.nats_options)
    slowest = max(load.latencies, key=load.latencies.__getitem__)
    row: dict[str, Any] = {
        "fault": fault,
        "workflows": len(names),
        "succeeded": len(succeeded),
        "outcomes": dict(load.outcomes),
        "errors": dict(list(load.errors.items())[:5]),
        "approvals": load.approvals,
        "C1": "ok" if succeeded else "FAIL",
        "C2": "ok" if all(s in workload.TERMINAL for s in states.values()) else "FAIL",
        "C3": "ok" if len(succeeded) == len(names) else "FAIL",
        "slowest_s": load.latencies[slowest],
        "slowest": slowest,
        "executions": 0,
        "C7": "?",
        "C8": "?",
    }
    print(f"\n{fault}: {json.dumps(row, default=str)}")
    assert row["C1"] == "ok" and row["C2"] == "ok", row
    assert row["C3"] == "ok", (load.outcomes, load.errors)
    # A proxy killed between an allow and its outcome record leaves an allow without an
    # execution record: at most one per client in flight.
    row["executions"] = check_executions(
        stored, unfinished_allowed=CLIENTS if fault == "tool-proxy" else 0
    )
    check_effects_once(stored, refunding=refunding & succeeded, succeeded=succeeded)
    row["C7"] = row["C8"] = "ok"
    return row


async def _faulted_run(mesh: Mesh, fault: str | None) -> tuple[workload.Load, float, float]:
    """The load, with ``fault`` killed a third into it and restarted DOWN_S later;
    returns the load, the kill's monotonic time and the restart's time to serving."""
    killed_at = 0.0
    restart_s = 0.0

    async def inject() -> None:
        nonlocal killed_at, restart_s
        if fault is None:
            return
        await asyncio.sleep(SECONDS / 3)  # the scenario's timeline, not a wait for an event
        assert processes.kill(mesh.data_dir, fault) is not None, f"{fault} was not running"
        killed_at = time.monotonic()
        await asyncio.sleep(DOWN_S)  # down for a while, as a crashed process is
        done = await asyncio.to_thread(restart, mesh.data_dir, fault)
        restart_s = done.seconds_to_ready

    load, _ = await asyncio.gather(
        workload.run(mesh.gateway, mesh.people(), CLIENTS, SECONDS), inject()
    )
    return load, killed_at, restart_s


async def test_no_fault_baseline(mesh: Mesh, table: list[dict[str, Any]]) -> None:
    load, _, _ = await _faulted_run(mesh, None)
    row = await _checks(mesh, load, "none")
    Baseline.rate = len(load.started) / SECONDS
    row.update(stall_s=0.0, restart_s=0.0, rate_ratio=1.0)
    table.append(row)


@pytest.mark.parametrize("fault", LONG_FAULTS if LONG else FAULTS)
async def test_kill_9_and_restart_loses_nothing_and_repeats_nothing(
    mesh: Mesh, table: list[dict[str, Any]], fault: str
) -> None:
    load, killed_at, restart_s = await _faulted_run(mesh, fault)
    stall = load.stall_after(killed_at)
    rate = len(load.started) / SECONDS
    try:
        row = await _checks(mesh, load, fault)
    except AssertionError:
        table.append(
            {
                "fault": fault,
                "workflows": len(load.started),
                "succeeded": load.outcomes["WORKFLOW_STATE_SUCCEEDED"],
                "C1": "?",
                "C2": "?",
                "C3": "FAIL?",
                "C7": "?",
                "C8": "?",
                "slowest_s": max(load.latencies.values(), default=0.0),
                "executions": 0,
                "stall_s": stall,
                "restart_s": restart_s,
                "rate_ratio": rate / Baseline.rate if Baseline.rate else 0.0,
            }
        )
        raise
    row.update(
        stall_s=stall,
        restart_s=restart_s,
        rate_ratio=rate / Baseline.rate if Baseline.rate else 0.0,
    )
    table.append(row)


async def test_one_of_two_agent_replicas_killed_for_good_the_other_takes_its_work(
    mesh: Mesh, table: list[dict[str, Any]]
) -> None:
    """Billing with two replicas: one is killed and not restarted during the run. Its
    registry entry outlives it until its heartbeat TTL; tasks sent there meet a
    refused connection (transient) and go to the live replica instead."""
    original = processes.read_record(mesh.data_dir, "agent-billing")
    assert original is not None
    second = "agent-billing-2"
    env = {
        **os.environ,
        **original.env,
        "TESSERA_AGENT_BILLING_LISTEN": f"127.0.0.1:{free_port()}",
    }
    processes.spawn(mesh.data_dir, second, original.argv, env=env, cwd=PROJECT)
    try:
        recorded = state_file.read(mesh.data_dir)
        assert recorded is not None
        billing = next(c for c in recorded.components if c.name == "agent-billing")
        spawned = processes.read_record(mesh.data_dir, second)
        assert spawned is not None
        replica = dataclasses.replace(
            billing, address=env["TESSERA_AGENT_BILLING_LISTEN"], pid=spawned.pid
        )
        # Probed over mTLS as the operator, exactly as `tessera up` probes it.
        operator = probe_identity(mesh.data_dir, recorded.components)
        await wait_service(replica, asyncio.get_running_loop().time() + 60, operator)

        async def inject() -> float:
            await asyncio.sleep(SECONDS / 3)  # the scenario's timeline
            assert processes.kill(mesh.data_dir, "agent-billing") is not None
            return time.monotonic()

        load, killed_at = await asyncio.gather(
            workload.run(mesh.gateway, mesh.people(), CLIENTS, SECONDS), inject()
        )
        row = await _checks(mesh, load, "agent-billing (1 of 2, not restarted)")
    finally:
        if processes.read_record(mesh.data_dir, "agent-billing") is not None:
            await asyncio.to_thread(restart, mesh.data_dir, "agent-billing")
        processes.stop(mesh.data_dir, second)
    row.update(
        stall_s=load.stall_after(killed_at),
        restart_s=0.0,
        rate_ratio=len(load.started) / SECONDS / Baseline.rate if Baseline.rate else 0.0,
    )
    table.append(row)
