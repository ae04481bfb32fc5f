"""Sustained load with RELIABILITY.md's end-of-run checks, on the real mesh: W(N, T).

N clients, each starting support-refund workflows one after another for T seconds
(triage → billing, which calls `billing.get_invoices` and the side-effecting
`billing.issue_refund` with an idempotency key through the governed tool proxy → synthesis),
then, after the last one ended:

- C1 at least one workflow completed; C2 every workflow started is terminal in JetStream;
  C3 none failed; C5 the slowest is reported;
- C6 every tool execution has an `allow` record carrying its decision id (an `allow` that
  a refusal of the same call follows did not execute), and every audit chain verifies;
- C7 no side effect happened twice: one refund per workflow, one per idempotency key.

Then the same with the tool proxy killed (SIGKILL) a third into the run and restarted at
once: C1-C3 and C5-C7 still hold (an `allow` whose outcome record the kill prevented is
allowed, at most one per client), and the slowest workflows show the task failures the
kill caused. C4 (throughput against a fault-free baseline) is not asserted: both runs
print their rate to compare, but on this shared 2-core machine a 90 % bound on a 12 s
window would be noise. CI runs the sustained load as RELIABILITY.md says, W(50, 3 min)
(`TESSERA_LOAD_CLIENTS`, `TESSERA_LOAD_SECONDS`), and the kill at W(8, 12 s)
(`TESSERA_LOAD_KILL_CLIENTS`, `TESSERA_LOAD_KILL_SECONDS`): the chaos suite
(tests/chaos/) kills every other process kind the same way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from tests.conftest import OpenBao
from tests.end_of_run import check_effects_once, check_executions, read_stored
from tests.integration.harness import REFERENCE_AGENTS, WS, Mesh, reference_agent

CLIENTS = int(os.environ.get("TESSERA_LOAD_CLIENTS", "50"))
SECONDS = float(os.environ.get("TESSERA_LOAD_SECONDS", "180"))
KILL_CLIENTS = int(os.environ.get("TESSERA_LOAD_KILL_CLIENTS", "8"))
KILL_SECONDS = float(os.environ.get("TESSERA_LOAD_KILL_SECONDS", "12"))


@pytest.fixture(scope="module")
async def mesh(nats_url: str, openbao: OpenBao) -> AsyncIterator[Mesh]:
    """The reference agents, planner, coordinator and policy service in this process; the
    tool proxy in a process of its own, so that it can be killed."""
    agents = [reference_agent(name) for name in REFERENCE_AGENTS]
    async with Mesh(
        nats_url, "load", agents=agents, vault=openbao, tool_proxy_process=True
    ) as running:
        yield running


async def test_sustained_load_passes_the_end_of_run_checks(mesh: Mesh) -> None:
    load = await run_load(mesh, CLIENTS, SECONDS)
    await end_of_run_checks(mesh, load)


async def test_tool_proxy_killed_under_load_loses_nothing_and_repeats_nothing(
    mesh: Mesh,
) -> None:
    """kill -9 of the tool proxy a third into the run, restarted at once: calls in flight
    fail (the agents' tasks are retried by the coordinator), refunds that ran before the
    kill are replayed from the idempotency store, never repeated."""

    async def fault() -> None:
        await asyncio.sleep(KILL_SECONDS / 3)  # the scenario's timeline, not a wait for an event
        mesh.kill_tool_proxy()
        await mesh.start_tool_proxy()

    load = await run_load(mesh, KILL_CLIENTS, KILL_SECONDS, fault=fault())
    await end_of_run_checks(mesh, load, killed=True)
    # The kill did hit the load: some workflows had tool calls fail (the proxy was gone for
    # about a second, at ~40 tool calls a second) and their tasks retried. Looked for in
    # every workflow: which ones the kill delayed most depends on the machine's load.
    failed = [
        e.task_failed.error.code
        for name in load.started
        for e in await mesh.events(name)
        if e.HasField("task_failed")
    ]
    assert failed, "no task failed: the kill hit no tool call"


class Load:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.latencies: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.clients = 0
        self.seconds = 0.0


async def run_load(
    mesh: Mesh, clients: int, seconds: float, *, fault: Coroutine[Any, Any, None] | None = None
) -> Load:
    """W(clients, seconds): each client starts the next workflow when its last one ended."""
    load = Load()
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            ticket = {
                "id": f"L-{i}-{n}",
                "customer_id": f"C-{i}",
                # Under the approval threshold: every refund runs without a human.
                "text": f"please refund {10 + n % 90} for the double charge",
            }
            began = time.monotonic()
            name = await mesh.start("support", ticket=ticket)
            load.started.append(name)
            workflow = await mesh.finished(name, timeout=60)
            load.latencies[name] = time.monotonic() - began
            load.outcomes[WS.Name(workflow.state)] += 1
            if workflow.state != WS.WORKFLOW_STATE_SUCCEEDED:
                load.errors[name] = workflow.error.message
            n += 1

    load.clients, load.seconds = clients, seconds
    await asyncio.gather(*(client(i) for i in range(clients)), *([fault] if fault else []))
    return load


async def end_of_run_checks(mesh: Mesh, load: Load, *, killed: bool = False) -> None:
    started = load.started
    # C1, C3.
    assert load.outcomes["WORKFLOW_STATE_SUCCEEDED"] >= 1, load.outcomes
    assert set(load.outcomes) == {"WORKFLOW_STATE_SUCCEEDED"}, (load.outcomes, load.errors)
    # C2: what JetStream holds, read back (not what the clients saw).
    states = Counter([WS.Name((await mesh.get(name)).state) for name in started])
    assert states == Counter({"WORKFLOW_STATE_SUCCEEDED": len(started)}), states
    # C5.
    slowest = max(load.latencies, key=load.latencies.__getitem__)
    print(
        f"\nW({load.clients}, {load.seconds:g}s){' with kill -9' if killed else ''}: "
        f"{len(started)} workflows, {len(started) / load.seconds:.1f} wf/s, "
        f"slowest {load.latencies[slowest]:.2f}s ({slowest})"
    )

    ids = {name.split("/")[1] for name in started}
    stored = await read_stored(mesh.nats_url, mesh.namespace, ids)
    executions = check_executions(stored, unfinished_allowed=load.clients if killed else 0)
    assert executions >= 2 * len(started)  # the invoices lookup and the refund, at least
    # A restarted proxy (same host, same replica id) continued its audit chain.
    assert len([c for c in stored.report.chains if c.writer.startswith("tool-proxy-")]) == 1
    # C7 (every workflow here refunds once) and C8.
    check_effects_once(stored, refunding=ids, succeeded=ids)
