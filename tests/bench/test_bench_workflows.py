"""The workflow benchmark: the same 4-step supervisor workflow (supervisor -> worker ->
supervisor -> synthesizer, trivial steps) through the real mesh, through LangGraph +
SqliteSaver and through Restate (server and Python SDK), in one run on one machine, each
with its default durable persistence (SQLite commits every checkpoint with its default
synchronous=FULL; JetStream runs with `sync_interval: always`). Also: a 40-step mesh
workflow for the per-step cost, the coordinator's resume after kill -9 and its memory
with workflows parked on approval. Prints a table and writes JSON; asserts only that
things worked, never absolute timings (ratios against the baselines measured in the same
run are the point). The floor (informational): the same workflow against the same agent
process by a minimal orchestrator with no durability, what the agent hops alone cost.
See tests/bench/README.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import langgraph.checkpoint.sqlite  # noqa: F401 (the baseline is required: a dev dependency)
import pytest

from tests.bench import durability, harness
from tests.bench.report import render, write
from tests.bench.restate_side import RestateSide, restate_run

RESULT = harness.REPO / ".tessera" / "bench" / "workflows.json"


async def run_benchmark(
    directory: Path,
    *,
    concurrencies: list[int],
    warmup: float,
    duration: float,
    resume_workflows: int,
    resume_ack_waits: list[float | None],
    parked: int,
    langgraph_modes: tuple[str, ...] = ("sync", "async"),
    long_concurrency: int = 4,
) -> dict[str, Any]:
    began = time.monotonic()
    env = harness.environment()
    mesh = harness.Infra(directory)
    restate = RestateSide(directory / "restate")
    try:
        await mesh.start()
        await restate.start()
        env["restate_release_check_blocked"] = restate.release_check_blocked
        coordinator = harness.CoordinatorProcess(mesh)
        env["coordinator_start_to_serving_ms"] = await coordinator.ready() * 1000
        runs: dict[str, list[dict[str, Any]]] = {"mesh": [], "floor": []}
        runs.update({f"langgraph_{m}": [] for m in langgraph_modes})
        runs["restate"] = []
        try:
            # Interleaved per concurrency level, so drift in the machine's load (it is
            # shared) spreads over every side instead of landing on one.
            for concurrency in concurrencies:
                runs["mesh"].append(
                    await harness.mesh_run(
                        mesh, coordinator, concurrency, warmup=warmup, duration=duration
                    )
                )
                runs["floor"].append(
                    await harness.floor_run(mesh, concurrency, warmup=warmup, duration=duration)
                )
                for mode in langgraph_modes:
                    runs[f"langgraph_{mode}"].append(
                        await harness.langgraph_run(
                            directory, mode, concurrency, warmup=warmup, duration=duration
                        )
                    )
                runs["restate"].append(
                    await restate_run(restate, concurrency, warmup=warmup, duration=duration)
                )
            # The 40-step workflow with a 256 KB blackboard, for the per-step cost beside
            # the 4-step one's (a longer window: each workflow takes 10x the steps).
            runs["mesh_long"] = [
                await harness.mesh_run(
                    mesh,
                    coordinator,
                    long_concurrency,
                    warmup=warmup,
                    duration=duration * 2,
                    workload="long",
                )
            ]
            env["coordinator_rss_after_sweep_mb"] = harness.rss_mb(coordinator.pid)
        finally:
            coordinator.stop()
        # No replica died during the sweep: any redelivery is a live step whose heartbeat
        # came later than ack_wait (a stalled event loop).
        env["work_steps_redelivered_during_sweep"] = coordinator.redelivered_steps()
        resume = [
            await durability.resume_after_kill(mesh, ack_wait_s=a, workflows=resume_workflows)
            for a in resume_ack_waits
        ]
        memory = await durability.parked_memory(mesh, workflows=parked)
    finally:
        await restate.close()
        mesh.stop()
    env["loadavg_at_end"] = harness.machine_load()
    env["wall_s"] = time.monotonic() - began
    return {"runs": runs, "resume": resume, "memory": memory, "environment": env}


def _check(report: dict[str, Any]) -> None:
    for side, runs in report["runs"].items():
        for run in runs:
            assert run["completed"] > 0, (side, run)
            if side.startswith("mesh"):
                # JetStream's counters were read: at least the history and the queue.
                assert run["jetstream"]["appended_per_wf"] > 0, run["jetstream"]
            assert (
                set(run["outcomes"]) == {"workflow_completed"}
                or run["outcomes"].get("wrong_result", 0) == 0
            ), (side, run["outcomes"])
    # The floor retries nothing: every workflow it ran must have completed correctly.
    for run in report["runs"]["floor"]:
        assert set(run["outcomes"]) == {"workflow_completed"}, run["outcomes"]
    for resume in report["resume"]:
        assert resume["completed"] == resume["workflows_in_flight"], resume
        # Each phase ran at the ack wait it names (the consumer is created or updated).
        assert resume["consumer_ack_wait_s"] == pytest.approx(resume["ack_wait_s"]), resume
    assert report["memory"]["approve_to_completed_ms"] > 0


async def test_workflow_bench_smoke(tmp_path: Path) -> None:
    """Bounded (about 30 s): every phase once at small N, resume at the default ack wait;
    writes to tmp, not the report."""
    report = await run_benchmark(
        tmp_path,
        concurrencies=[4],
        warmup=0.5,
        duration=1.5,
        resume_workflows=4,
        resume_ack_waits=[None],
        parked=100,
        langgraph_modes=("sync",),
    )
    summary = write(report, tmp_path / "workflows.json")
    print("\n" + render(summary))
    _check(report)


@pytest.mark.slow
async def test_workflow_bench_full(tmp_path: Path) -> None:
    """`make bench`: the sweep (mesh, floor, LangGraph; 1 to 64 in flight), the 40-step
    workflow, resume at the default ack wait
    and at the former 2 s default, and 10,000 parked workflows. Writes
    .tessera/bench/workflows.json."""
    report = await run_benchmark(
        tmp_path,
        concurrencies=[1, 8, 32, 64],
        warmup=2.0,
        duration=10.0,
        resume_workflows=32,
        resume_ack_waits=[None, 2.0],
        parked=10_000,
        long_concurrency=8,  # a level of the sweep: per-step costs compared at equal load
    )
    summary = write(report, RESULT)
    print("\n" + render(summary))
    print(f"\nwritten: {RESULT}")
    _check(report)
    assert json.loads(RESULT.read_text())["throughput"]["ratio"] > 0
