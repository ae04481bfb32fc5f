"""The benchmark's durability phases, on the processes of harness.py: the coordinator's
resume after kill -9 with steps in flight, and its memory with workflows parked on an
approval gate. Both watch the workflow history subjects on core NATS."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
from typing import Any

import grpc
import nats
import nats.js.errors
from nats.aio.msg import Msg

from tessera.runtime.history import entry_events
from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc, events_pb2
from tests.bench.harness import DEFAULT_ACK_WAIT_S, CoordinatorProcess, Infra, rss_mb
from tests.bench.workload import parked_plan, supervisor_plan

# -- event watching (resume and parking phases) -----------------------------------------


class EventWatch:
    """Every workflow event of the namespace as core NATS delivers it, with its arrival
    time (time.monotonic())."""

    def __init__(self, mesh: Infra) -> None:
        self.mesh = mesh
        self.seen: list[tuple[float, str, str, events_pb2.WorkflowEvent]] = []
        self.counts: dict[str, int] = {}
        self.changed = asyncio.Event()

    async def __aenter__(self) -> EventWatch:
        self.nc = await nats.connect(self.mesh.nats_url)
        self.sub = await self.nc.subscribe(
            self.mesh.topology.wf_events_subjects, cb=self._on, pending_msgs_limit=1_000_000
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()
        await self.nc.close()

    async def _on(self, msg: Msg) -> None:
        at = time.monotonic()
        for event in entry_events(msg.data):
            kind = event.WhichOneof("kind") or ""
            self.seen.append((at, event.workflow_id, kind, event))
            self.counts[kind] = self.counts.get(kind, 0) + 1
        self.changed.set()

    async def until(self, predicate: Any, *, timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

    def after(self, t: float, ids: Iterable[str]) -> list[tuple[float, str, str]]:
        wanted = set(ids)
        return [(at, wf, kind) for at, wf, kind, _ in self.seen if at > t and wf in wanted]


async def start_workflows(address: str, plan: Any, n: int, *, concurrency: int = 64) -> list[str]:
    """StartWorkflow `n` times (at most `concurrency` at once); returns workflow ids."""
    ids: list[str] = []
    queue = iter(range(n))
    async with grpc.aio.insecure_channel(address) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)

        async def client() -> None:
            for _ in queue:
                response = await stub.StartWorkflow(
                    coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=plan),
                    timeout=60,
                )
                ids.append(response.workflow.name.split("/", 1)[1])

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids


async def reset_work_consumer(mesh: Infra) -> None:
    """Delete the coordinators' durable work consumer (only while no coordinator runs;
    the work-queue stream keeps its messages), so each phase starts from a consumer its
    own coordinator created. `Runner.start` creates or updates the consumer (the last
    replica started sets its ack_wait); `consumer_ack_wait_s` in the results checks that
    the phase really ran at the ack wait it names (see README.md, findings)."""
    nc = await nats.connect(mesh.nats_url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_consumer(mesh.topology.work_stream, "coordinator")
    finally:
        await nc.close()


async def work_consumer_ack_wait(mesh: Infra) -> float:
    nc = await nats.connect(mesh.nats_url)
    try:
        info = await nc.jetstream().consumer_info(mesh.topology.work_stream, "coordinator")
        return float(info.config.ack_wait or 0)
    finally:
        await nc.close()


async def resume_after_kill(
    mesh: Infra, *, ack_wait_s: float | None, workflows: int, hold_s: float = 0.3
) -> dict[str, Any]:
    """Workflows with a step in flight (the worker holds `hold_s`, shorter than a
    coordinator's start, so the agent's answer is ready and cached by the time the
    re-sent attempt arrives; the hold never bounds the figure), kill -9 the
    coordinator, start a new one (same settings) and time the first progress event of
    those workflows from the new process's SERVING and from the kill."""
    await reset_work_consumer(mesh)
    first = CoordinatorProcess(mesh, ack_wait_s=ack_wait_s)
    second: CoordinatorProcess | None = None
    try:
        await first.ready()
        effective_ack_wait = await work_consumer_ack_wait(mesh)
        async with EventWatch(mesh) as watch:
            ids = await start_workflows(
                first.address, supervisor_plan(hold_s=hold_s), workflows, concurrency=workflows
            )
            await watch.until(
                lambda w: (
                    sum(
                        1
                        for _, wf, kind, e in w.seen
                        if kind == "task_dispatched" and e.task_dispatched.task_id == "sup.1"
                    )
                    >= workflows
                ),
                timeout=30,
            )
            killed_at = first.kill()  # every workflow's worker step is in flight
            second = CoordinatorProcess(mesh, ack_wait_s=ack_wait_s)
            await second.ready()
            serving_at = second.serving_at
            await watch.until(
                lambda w: w.counts.get("workflow_completed", 0) >= workflows, timeout=60
            )
            progress = watch.after(killed_at, ids)
            first_at = min(at for at, _, _ in progress)
            per_wf: dict[str, float] = {}
            for at, wf, _ in progress:
                per_wf.setdefault(wf, at)
            all_at = max(per_wf.values())
        result = {
            "ack_wait_s": ack_wait_s if ack_wait_s is not None else DEFAULT_ACK_WAIT_S,
            "default": ack_wait_s is None,
            "consumer_ack_wait_s": effective_ack_wait,
            "workflows_in_flight": workflows,
            "kill_to_serving_ms": (serving_at - killed_at) * 1000,
            "serving_to_first_progress_ms": (first_at - serving_at) * 1000,
            "kill_to_first_progress_ms": (first_at - killed_at) * 1000,
            "serving_to_all_progressed_ms": (all_at - serving_at) * 1000,
            "kill_to_all_progressed_ms": (all_at - killed_at) * 1000,
            "completed": len({wf for _, wf, kind in progress if kind == "workflow_completed"}),
        }
    finally:
        first.stop()
        if second is not None:
            second.stop()
    # The replacement takes over the killed replica's steps: one redelivery each.
    assert second is not None
    result["steps_redelivered_to_replacement"] = second.redelivered_steps()
    return result


async def parked_memory(mesh: Infra, *, workflows: int) -> dict[str, Any]:
    """RSS of a coordinator with `workflows` parked on an approval gate, and of a fresh
    replica (after kill -9) with the same workflows parked; then one of them is approved
    through the fresh replica and followed to completion."""
    await reset_work_consumer(mesh)
    coordinator = CoordinatorProcess(mesh)
    fresh: CoordinatorProcess | None = None
    try:
        await coordinator.ready()
        await asyncio.sleep(1.0)
        idle = rss_mb(coordinator.pid)
        async with EventWatch(mesh) as watch:
            began = time.monotonic()
            ids = await start_workflows(coordinator.address, parked_plan(), workflows)
            await watch.until(
                lambda w: w.counts.get("gate_opened", 0) >= workflows,
                timeout=max(120, workflows / 20),
            )
            parked_s = time.monotonic() - began
            await asyncio.sleep(1.0)
            parked = rss_mb(coordinator.pid)
            peak = rss_mb(coordinator.pid, "VmHWM")
            coordinator.kill()
            fresh = CoordinatorProcess(mesh)
            await fresh.ready()
            await asyncio.sleep(1.0)
            fresh_rss = rss_mb(fresh.pid)
            # Resume of a parked workflow on the new replica: approve, follow to the end.
            wf = ids[0]
            async with grpc.aio.insecure_channel(fresh.address) as ch:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
                decided = time.monotonic()
                await stub.DecideGate(
                    coordinator_pb2.DecideGateRequest(
                        name=f"workflows/{wf}/gates/approve-approval",
                        decision=coordinator_pb2.GATE_DECISION_APPROVE,
                        decided_by="bench",
                    ),
                    timeout=30,
                )
                await watch.until(
                    lambda w: any(
                        x[1] == wf and x[2] == "workflow_completed" for x in w.seen[-50:]
                    ),
                    timeout=30,
                )
                approve_to_done = time.monotonic() - decided
                first_progress = min(
                    at for at, wf_id, kind in watch.after(decided, [wf]) if kind != "gate_decided"
                )
        return {
            "parked_workflows": workflows,
            "rss_idle_mb": idle,
            "rss_parked_mb": parked,
            "rss_peak_while_parking_mb": peak,
            "rss_fresh_replica_with_parked_mb": fresh_rss,
            "park_rate_wf_s": workflows / parked_s,
            "approve_to_first_progress_ms": (first_progress - decided) * 1000,
            "approve_to_completed_ms": approve_to_done * 1000,
        }
    finally:
        coordinator.stop()
        if fresh is not None:
            fresh.stop()
