"""Loss of one of three NATS nodes while workflows run (RELIABILITY.md, "NATS 3-node
cluster").

A real 3-node JetStream cluster (the launcher's code, as `tessera up --nats-cluster 3`
starts it) with every stream and bucket at 3 replicas; the planner, a coordinator and a
test agent in-process, connected to all three nodes. The node leading the work queue is
killed with SIGKILL while workflows are mid-flight. Then: every workflow completed
(C1-C3), each workflow's event history is contiguous with no transition recorded twice,
and the agent ran once per task attempt. Finally the node comes back on its old store and
the cluster heals.

The assets the dead node led are leaderless until JetStream elects new leaders (4-9 s,
Raft election timeouts); the tests wait for that "settle period" (C2) with their own NATS
client before they read through the coordinator.

Also: `tessera up --nats-cluster 3` starts, reports and stops the three nodes, and hands
the services every node's URL and 3 replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats
import pytest
import yaml

from tessera.agent import Agent, TaskContext, TaskResult
from tessera.cli._local import nats_options
from tessera.launcher import cluster, infra, processes
from tessera.launcher import mesh as mesh_launcher
from tessera.launcher.mesh import plan_ports
from tessera.launcher.topology import load, project_root
from tessera.runtime.bus import Topology, connect
from tessera.v1 import coordinator_pb2, events_pb2
from tests.integration.harness import TERMINAL, WS, Mesh, task, task_graph

WORKFLOWS = 10
KILL_AFTER_EXECUTIONS = 12
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

EXECUTIONS: Counter[tuple[str, str, int]] = Counter()
EXECUTED = asyncio.Event()

agent = Agent("natsfault", version="1.0.0")


@agent.capability(
    "natsfault.step",
    version="1.0.0",
    side_effect="external_action",
    reads=["steps"],
    writes=["steps"],
    timeout_s=20,
)
async def step(ctx: TaskContext) -> TaskResult:
    """One unit of work that takes a moment, so workflows are mid-flight at the kill."""
    EXECUTIONS[(ctx.workflow_id, ctx.task_id, ctx.attempt)] += 1
    EXECUTED.set()
    await asyncio.sleep(0.15)  # the work itself, not synchronisation
    return TaskResult(output={"task": ctx.task_id}, writes={"steps": ctx.task_id})


PLAN = task_graph(
    "nats-fault",
    *(task(t, "natsfault.step", max_attempts=5) for t in ("a", "b", "c")),
    task("join", "natsfault.step", "a", "b", "c", max_attempts=5),
    task("final", "natsfault.step", "join", max_attempts=5),
)


@pytest.fixture
async def mesh(nats_cluster: cluster.NatsCluster) -> AsyncIterator[Mesh]:
    EXECUTIONS.clear()
    async with Mesh(
        nats_cluster.url,
        "nc" + uuid.uuid4().hex[:6],
        agents=[agent],
        jetstream_replicas=nats_cluster.replicas,
    ) as running:
        yield running


async def _start(mesh: Mesh) -> str:
    """StartWorkflow as a client is told to call it: UNAVAILABLE (the streams of a fresh
    cluster still electing leaders on a busy machine) is retried with the same request id,
    which makes the retry idempotent, for a bounded time."""
    request = coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=PLAN)
    give_up = time.monotonic() + 30
    while True:
        try:
            response = await mesh.stub.StartWorkflow(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.2)  # backoff between retries, not synchronisation
            continue
        return response.workflow.name


async def _terminal(mesh: Mesh, name: str, *, deadline: float) -> coordinator_pb2.Workflow:
    """Poll GetWorkflow (read from the replicated KV) until the workflow is terminal."""
    while True:
        workflow = await mesh.get(name)
        if workflow.state in TERMINAL:
            return workflow
        if time.monotonic() >= deadline:
            raise AssertionError(f"{name} is {WS.Name(workflow.state)} at the deadline")
        await asyncio.sleep(0.1)


async def _executions_reach(count: int, *, within: float) -> None:
    async with asyncio.timeout(within):
        while sum(EXECUTIONS.values()) < count:
            EXECUTED.clear()
            await EXECUTED.wait()


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while processes.pid_exists(pid):  # reaps our child
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


async def _kill_work_queue_leader(mesh: Mesh, nats_cluster: cluster.NatsCluster) -> str:
    """SIGKILL the node leading the work-queue stream; its server name."""
    nc = await nats.connect(servers=mesh.nats_url.split(","))
    try:
        info = await nc.jetstream().stream_info(Topology(mesh.namespace).work_stream)
    finally:
        await nc.close()
    assert info.config.num_replicas == 3
    assert info.cluster is not None and info.cluster.leader
    victim = nats_cluster.node(info.cluster.leader)
    os.kill(victim.pid, signal.SIGKILL)
    assert await asyncio.to_thread(_gone, victim.pid, 5.0)
    return info.cluster.leader


async def _settled(mesh: Mesh, *, dead: str | None, within: float) -> None:
    """Wait until each of the test's streams and buckets has a live leader and, with no
    dead node, two current followers. Errors are expected while JetStream re-elects."""
    ours = (f"{mesh.namespace.upper()}_", f"KV_{mesh.namespace}_")
    expected = len(Topology(mesh.namespace).streams()) + len(Topology(mesh.namespace).buckets())
    deadline = time.monotonic() + within
    nc = await nats.connect(servers=mesh.nats_url.split(","))
    try:
        js = nc.jetstream(timeout=1.0)
        pending: list[str] = ["(not read yet)"]
        while pending:
            if time.monotonic() >= deadline:
                raise AssertionError(f"JetStream did not settle within {within}s: {pending}")
            try:
                infos = [
                    i for i in await js.streams_info() if (i.config.name or "").startswith(ours)
                ]
            except Exception as exc:  # no meta leader yet, or a timeout
                pending = [repr(exc)]
            else:
                pending = [
                    info.config.name or ""
                    for info in infos
                    if info.cluster is None
                    or info.cluster.leader in (None, "", dead)
                    or (
                        dead is None
                        and (
                            len(info.cluster.replicas or []) != 2
                            or not all(r.current for r in info.cluster.replicas or [])
                        )
                    )
                ]
                if len(infos) != expected:
                    pending.append(f"{len(infos)} of {expected} streams listed")
            if pending:
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def _transition(event: events_pb2.WorkflowEvent) -> tuple[str, str, int]:
    kind = event.WhichOneof("kind") or ""
    body = getattr(event, kind)
    return kind, getattr(body, "task_id", ""), getattr(body, "attempt", 0)


async def test_workflows_complete_when_a_nats_node_is_killed(
    mesh: Mesh, nats_cluster: cluster.NatsCluster, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 60
    names = [await _start(mesh) for _ in range(WORKFLOWS)]
    await _executions_reach(KILL_AFTER_EXECUTIONS, within=20)

    dead = await _kill_work_queue_leader(mesh, nats_cluster)
    assert sum(EXECUTIONS.values()) < len(PLAN.tasks) * WORKFLOWS, "all done before the kill"
    await _settled(mesh, dead=dead, within=30)
    workflows = await asyncio.gather(*(_terminal(mesh, n, deadline=deadline) for n in names))

    # C1-C3: all terminal in JetStream, all succeeded (the test injected no failure).
    states = Counter(WS.Name(w.state) for w in workflows)
    assert states == {"WORKFLOW_STATE_SUCCEEDED": WORKFLOWS}, states
    ids = {n.split("/")[1] for n in names}
    for name, workflow in zip(names, workflows, strict=True):
        events = await mesh.events(name)
        assert [e.sequence for e in events] == list(range(1, workflow.event_count + 1)), name
        # A transient fault (the ledger or a stream mid-election) is retried under the same
        # attempt number by design, so each retry records its own transient TaskFailed;
        # a second advancing replica would repeat the other transitions.
        steps = [e for e in events if not (e.HasField("task_failed") and e.task_failed.transient)]
        duplicated = [t for t, n in Counter(map(_transition, steps)).items() if n > 1]
        assert not duplicated, (name, duplicated)
    # The agent ran every task, once per attempt (the SDK deduplicates redeliveries).
    assert {(wf, task) for wf, task, _ in EXECUTIONS} == {
        (wf, t.id) for wf in ids for t in PLAN.tasks
    }
    twice = {key: n for key, n in EXECUTIONS.items() if n > 1}
    assert not twice, twice

    # The node comes back on its store; the cluster agrees on a meta leader and every
    # stream's replicas catch up.
    index = next(i for i, _ in enumerate(nats_cluster.nodes) if cluster.server_name(i) == dead)
    restarted = await asyncio.to_thread(cluster.start_node, tmp_path, nats_cluster.ports, index)
    nodes = [restarted if i == index else n for i, n in enumerate(nats_cluster.nodes)]
    await asyncio.to_thread(cluster.wait_cluster_ready, nodes, timeout=20)
    await _settled(mesh, dead=None, within=max(5.0, deadline - time.monotonic()))


async def test_a_workflow_started_during_failover_is_refused_retryably_or_completes(
    mesh: Mesh, nats_cluster: cluster.NatsCluster
) -> None:
    deadline = time.monotonic() + 25
    running = [await _start(mesh) for _ in range(3)]
    await _executions_reach(3, within=20)
    dead = await _kill_work_queue_leader(mesh, nats_cluster)

    # A client retries with the same request id until the coordinator accepts it.
    request = coordinator_pb2.StartWorkflowRequest(request_id=uuid.uuid4().hex, plan=PLAN)
    refusals: list[grpc.StatusCode] = []
    while True:
        try:
            name = (await mesh.stub.StartWorkflow(request, timeout=10)).workflow.name
            break
        except grpc.aio.AioRpcError as err:
            refusals.append(err.code())
            assert time.monotonic() < deadline, refusals
        await asyncio.sleep(0.2)
    await _settled(mesh, dead=dead, within=30)
    workflows = await asyncio.gather(
        *(_terminal(mesh, n, deadline=deadline) for n in [*running, name])
    )
    assert all(w.state == WS.WORKFLOW_STATE_SUCCEEDED for w in workflows)
    # A refusal during fail-over must say "retry" (RELIABILITY.md: UNAVAILABLE).
    assert set(refusals) <= TRANSIENT, refusals


def test_plan_ports_gives_each_node_client_monitor_and_route_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mesh_launcher, "ensure_free", lambda name, port: None)  # layout only
    topology = load(project_root() / "deploy/local/topology.yaml")
    base = 30000
    ports = plan_ports(topology, base_port=base, nats_cluster=3)
    assert "nats" not in ports and "nats-monitor" not in ports
    for i in range(3):
        node = cluster.node_name(i)
        assert [ports[node], ports[f"{node}-monitor"], ports[f"{node}-cluster"]] == [
            base + 100 + 3 * i + slot for slot in range(3)
        ]
    assert len(set(ports.values())) == len(ports)


def test_up_with_a_nats_cluster_reports_and_stops_every_node(tmp_path: Path) -> None:
    root = project_root(Path(__file__).parent)
    full = yaml.safe_load((root / "deploy/local/topology.yaml").read_text())
    services = [s for s in full["services"] if s["name"] in ("planner", "coordinator")]
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump({"services": services}))
    data_dir = tmp_path / "mesh"
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TESSERA_DATA_DIR", None)

    def tessera(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tessera.cli.main", *args, "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=120,
            check=False,
        )

    try:
        up = tessera("up", "--nats-cluster", "3", "--topology", str(topology))
        assert up.returncode == 0, up.stderr
        state = json.loads((data_dir / "state.json").read_text())
        components = {c["name"]: c for c in state["components"]}
        nodes = [components[cluster.node_name(i)] for i in range(3)]
        for node in nodes:
            assert node["kind"] == "infra" and node["name"] in up.stdout
            assert node["health_url"].endswith("/healthz?js-enabled-only=true")
        urls = ",".join(node["address"] for node in nodes)
        environ = Path(f"/proc/{components['coordinator']['pid']}/environ").read_bytes()
        assert f"TESSERA_NATS_URL={urls}".encode() in environ.split(b"\0")
        assert b"TESSERA_JETSTREAM_REPLICAS=3" in environ.split(b"\0")
        for node in nodes:  # one JetStream cluster, n1..n3, with a meta leader
            monitor = f"http://127.0.0.1:{state['ports'][node['name'] + '-monitor']}"
            server = infra.NatsServer(
                node["name"], node["address"], monitor, node["pid"], node["log_path"], ""
            )
            assert cluster.meta_leader(server) in {"n1", "n2", "n3"}

        async def replicas() -> dict[str, int]:
            nc = await connect(urls, name="test", **nats_options(data_dir))
            try:
                infos = await nc.jetstream().streams_info()
                return {i.config.name or "": i.config.num_replicas or 0 for i in infos}
            finally:
                await nc.close()

        found = asyncio.run(replicas())
        assert found and set(found.values()) == {3}, found
        status = tessera("status")
        assert status.returncode == 0, status.stdout
    finally:
        down = tessera("down")
    assert down.returncode == 0, down.stderr
    for i in range(3):
        assert f"{cluster.node_name(i)}: stopped" in down.stdout
    assert processes.recorded_names(data_dir) == []
