"""Benchmark: how soon a restarted process of the mesh is SERVING again, against a bare
grpc.aio server measured the same way in the same run.

`tessera up` (the launcher, in-process) starts the mesh in a tmp dir. Then, in rounds,
every service process it launched (policy, planner, tool-proxy, coordinator, the gateway
control plane, each reference agent) is killed with SIGKILL and started again with the
same argv, environment and working directory (read from /proc before the kill, like a
supervisor restarting it). Per restart:

- ``serving_s``: exec to grpc.health.v1 SERVING for every name the topology lists,
  probed by dialling as soon as the port accepts connections (2 ms polls);
- ``cpu_s``: CPU the new process used until then;
- ``peer_s``: exec until a client channel opened before the kill (with the mesh's
  reconnect backoff, polled while the process was down, as a coordinator retrying a task
  would) gets SERVING from the new process.

The mesh's services are probed over mTLS with the operator's certificate, as `tessera up`
probes them; their figures include obtaining their own certificate at start. The
baseline, ``bare-grpc``, is ``python -m tests.bench._bare_server``: plaintext grpc.aio
with only the health service (no identity to obtain), restarted and timed the same way,
interleaved with the others so drift in the shared machine's load spreads over all.
Phases: ``idle``, then ``loaded`` (one busy loop per core, each in its own session like
an unrelated program). Ratios are the point:
nothing asserts a timing; the test fails only if a process does not come back. Writes
``.tessera/bench/startup.json``; ``TESSERA_BENCH_STARTUP_ROUNDS`` (default 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.launcher import mesh, processes
from tessera.launcher.mesh import probe_identity
from tessera.launcher.operator import OperatorIdentity
from tessera.launcher.ports import free_port
from tessera.launcher.state import Component
from tessera.launcher.topology import Topology, load, project_root
from tessera.runtime.grpc_client import reconnect_options
from tests.bench.harness import cpu_s, machine_load

REPO = project_root(Path(__file__).parent)
RESULT = REPO / ".tessera" / "bench" / "startup.json"
BASELINE = "bare-grpc"
COME_BACK_S = 60.0
"""A process not SERVING this long after its restart fails the benchmark (not a timing
target: the point where it clearly did not come back)."""

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


@dataclass(frozen=True)
class Launch:
    """How to start one process again, as its launcher started it."""

    name: str
    address: str
    health: tuple[str, ...]
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path

    @classmethod
    def running(cls, data_dir: Path, component: Component) -> Launch:
        record = processes.read_record(data_dir, component.name)
        assert record is not None and processes.is_alive(record), component.name
        raw = Path(f"/proc/{record.pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        return cls(
            name=component.name,
            address=component.address,
            health=component.health,
            argv=record.argv,
            env=env,
            cwd=Path(os.readlink(f"/proc/{record.pid}/cwd")),
        )


@dataclass(frozen=True)
class Sample:
    serving_s: float
    peer_s: float
    cpu_s: float


def _probe(address: str, name: str, operator: OperatorIdentity | None) -> grpc.aio.Channel:
    """A channel to ``name``: mTLS as the operator for the mesh's services, plaintext for
    the bare baseline (whose server has no identity)."""
    if operator is None or name == BASELINE:
        return grpc.aio.insecure_channel(address, options=reconnect_options())
    return grpc.aio.secure_channel(
        address,
        operator.credentials(),
        options=[*reconnect_options(), *operator.options_for(name)],
    )


async def serving_at(
    address: str,
    names: Sequence[str],
    *,
    deadline: float,
    name: str = BASELINE,
    operator: OperatorIdentity | None = None,
) -> float:
    """``time.monotonic()`` at which every name of ``names`` first answers SERVING."""
    host, port = address.rsplit(":", 1)
    while time.monotonic() < deadline:
        try:
            _reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.002)
            continue
        writer.close()
        async with _probe(address, name, operator) as ch:
            if await _all_serving(health_pb2_grpc.HealthStub(ch), names, deadline=deadline):
                return time.monotonic()
    raise AssertionError(f"{address} not SERVING {COME_BACK_S:g}s after its restart")


async def _all_serving(
    stub: health_pb2_grpc.HealthStub, names: Sequence[str], *, deadline: float
) -> bool:
    """Poll until every name is SERVING (True), or the server is unreachable (False)."""
    while time.monotonic() < deadline:
        try:
            for name in names or [""]:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    break
            else:
                return True
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                return False
        await asyncio.sleep(0.002)
    return False


async def peer_sees(stub: health_pb2_grpc.HealthStub, names: Sequence[str], *, up: bool) -> float:
    """Poll a long-lived channel every 5 ms until it gets SERVING (``up``) or fails."""
    deadline = time.monotonic() + COME_BACK_S
    while time.monotonic() < deadline:
        try:
            for name in names or [""]:
                await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1)
            if up:
                return time.monotonic()
        except grpc.aio.AioRpcError:
            if not up:
                return time.monotonic()
        await asyncio.sleep(0.005)
    raise AssertionError("a peer channel never saw the restart")


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while processes.pid_exists(pid):
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.002)


async def restart(
    data_dir: Path,
    launch: Launch,
    peer: health_pb2_grpc.HealthStub,
    operator: OperatorIdentity | None,
) -> Sample:
    """SIGKILL the running ``launch.name``, start it again, time it back to SERVING."""
    record = processes.read_record(data_dir, launch.name)
    assert record is not None
    _kill(record.pid)
    await peer_sees(peer, launch.health, up=False)
    began = time.monotonic()
    new = processes.spawn(data_dir, launch.name, launch.argv, env=launch.env, cwd=launch.cwd)
    peer_back = asyncio.create_task(peer_sees(peer, launch.health, up=True))
    try:
        back = await serving_at(
            launch.address,
            launch.health,
            deadline=began + COME_BACK_S,
            name=launch.name,
            operator=operator,
        )
        cpu = cpu_s(new.pid)
        peer_at = await peer_back
    finally:
        peer_back.cancel()
    return Sample(back - began, peer_at - began, cpu)


@contextmanager
def busy_cores() -> Iterator[None]:
    """One busy loop per core, each in a session of its own (an unrelated program)."""
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.5)  # let the scheduler see them as the long-running load they are
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _stats(samples: list[Sample], base: dict[str, float] | None) -> dict[str, Any]:
    serving = statistics.median(s.serving_s for s in samples)
    peer = statistics.median(s.peer_s for s in samples)
    row: dict[str, Any] = {
        "n": len(samples),
        "serving_s": round(serving, 3),
        "serving_max_s": round(max(s.serving_s for s in samples), 3),
        "peer_s": round(peer, 3),
        "cpu_s": round(statistics.median(s.cpu_s for s in samples), 3),
    }
    if base is not None:
        row["ratio"] = round(serving / base["serving_s"], 2)
        row["peer_ratio"] = round(peer / base["peer_s"], 2)
    return row


def summarize(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    """Per process (and all agents together, as one kind): medians and ratios."""
    base = _stats(samples[BASELINE], None)
    base.update(ratio=1.0, peer_ratio=1.0)
    rows = {BASELINE: base}
    rows.update({name: _stats(s, base) for name, s in samples.items() if name != BASELINE})
    agents = [s for name, group in samples.items() if name.startswith("agent-") for s in group]
    if agents:
        rows["agents (all)"] = _stats(agents, base)
    return rows


async def measure(
    data_dir: Path, launches: list[Launch], rounds: int, operator: OperatorIdentity | None
) -> dict[str, Any]:
    samples: dict[str, list[Sample]] = {launch.name: [] for launch in launches}
    channels = {launch.name: _probe(launch.address, launch.name, operator) for launch in launches}
    try:
        stubs = {name: health_pb2_grpc.HealthStub(ch) for name, ch in channels.items()}
        for launch in launches:  # every peer channel is connected before the first kill
            await peer_sees(stubs[launch.name], launch.health, up=True)
        for _ in range(rounds):
            for launch in launches:
                samples[launch.name].append(
                    await restart(data_dir, launch, stubs[launch.name], operator)
                )
    finally:
        for ch in channels.values():
            await ch.close()
    return {"loadavg": machine_load(), "processes": summarize(samples)}


def render(report: dict[str, Any]) -> str:
    phases = [p for p in ("idle", "loaded") if p in report["phases"]]
    head = f"{'process':26s}" + "".join(
        f" | {p + ' s':>9s} {'x bare':>6s} {'max s':>6s} {'cpu s':>6s} {'peer s':>6s}"
        for p in phases
    )
    lines = [
        "STARTUP restart -> SERVING (medians; x bare = ratio to the bare grpc.aio server "
        "of the same phase; peer = a client channel open before the kill gets through)",
        head,
    ]
    names = list(report["phases"][phases[0]]["processes"])
    for name in names:
        line = f"{name:26s}"
        for phase in phases:
            row = report["phases"][phase]["processes"][name]
            line += (
                f" | {row['serving_s']:9.3f} {row['ratio']:6.2f} {row['serving_max_s']:6.3f}"
                f" {row['cpu_s']:6.2f} {row['peer_s']:6.3f}"
            )
        lines.append(line)
    lines.append(f"tessera up (everything at once): {report['up_s']:.1f} s")
    return "\n".join(lines)


async def run(
    directory: Path, base_port: int, *, topology: Topology, rounds: int, loaded: bool
) -> dict[str, Any]:
    data_dir = directory / "mesh"
    began = time.monotonic()
    # `up` runs its own event loop (asyncio.run): give it a thread.
    state = await asyncio.to_thread(
        mesh.up, data_dir, base_port=base_port, topology=topology, timeout=180
    )
    report: dict[str, Any] = {"cpus": os.cpu_count(), "up_s": time.monotonic() - began}
    try:
        bare_address = f"127.0.0.1:{free_port()}"
        argv = (sys.executable, "-m", "tests.bench._bare_server", bare_address)
        processes.spawn(data_dir, BASELINE, argv, cwd=REPO)
        bare = Launch(BASELINE, bare_address, (), argv, dict(os.environ), REPO)
        launches = [bare] + [
            Launch.running(data_dir, c) for c in state.components if c.kind == "service"
        ]
        operator = probe_identity(data_dir, state.components)
        report["phases"] = {"idle": await measure(data_dir, launches, rounds, operator)}
        if loaded:
            with busy_cores():
                report["phases"]["loaded"] = await measure(data_dir, launches, rounds, operator)
    finally:
        mesh.down(data_dir)
    return report


def _write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + render(report) + f"\n-> {path}")


def _assert_complete(report: dict[str, Any], rounds: int) -> None:
    for phase in report["phases"].values():
        for name, row in phase["processes"].items():
            if name != "agents (all)":
                assert row["n"] == rounds, (name, row)


async def test_startup_bench_smoke(tmp_path: Path, mesh_base_port: int) -> None:
    """Bounded: the planner, the coordinator, the registry and one agent (which is
    SERVING only once registered), one round, idle."""
    full = load(REPO / "deploy/local/topology.yaml")
    keep = {"planner", "coordinator", "registry", "agent-triage"}
    topology = Topology(tuple(s for s in full.services if s.name in keep))
    report = await run(tmp_path, mesh_base_port, topology=topology, rounds=1, loaded=False)
    _write(report, tmp_path / "startup.json")
    _assert_complete(report, 1)


@pytest.mark.slow
async def test_startup_bench_full(tmp_path: Path, mesh_base_port: int) -> None:
    rounds = int(os.environ.get("TESSERA_BENCH_STARTUP_ROUNDS", "3"))
    topology = load(REPO / "deploy/local/topology.yaml")
    report = await run(tmp_path, mesh_base_port, topology=topology, rounds=rounds, loaded=True)
    _write(report, RESULT)
    _assert_complete(report, rounds)
