"""`tessera up` / `status` / `down` as a user runs them: the real CLI in a subprocess.

Runs the services of deploy/local/topology.yaml (or of ``$TESSERA_TEST_TOPOLOGY``, e.g.
stand-ins while the services are being written) with real NATS, OpenBao and Envoy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tessera.cli.login import ensure_login
from tessera.launcher.operator import local_identity, operator_identity
from tessera.launcher.ports import free_port
from tessera.launcher.topology import Topology, load, project_root
from tessera.runtime.errors import error_details
from tessera.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc

PROJECT_ROOT = project_root(Path(__file__).parent)
TOPOLOGY_FILE = Path(
    os.environ.get("TESSERA_TEST_TOPOLOGY") or PROJECT_ROOT / "deploy/local/topology.yaml"
)
CLI_TIMEOUT_S = 90


def tessera(
    *args: str,
    data_dir: Path,
    topology: Path = TOPOLOGY_FILE,
    env: dict[str, str] | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run the `tessera` command line as a user would (``env``: settings on top)."""
    env = {**os.environ, "TESSERA_TOPOLOGY": str(topology), "COLUMNS": "200", **(env or {})}
    env.pop("TESSERA_DATA_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli.main", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=timeout_s,
        check=False,
    )


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line or environment mentions ``text``."""
    needle = text.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if (
                needle in (proc / "cmdline").read_bytes()
                or needle in (proc / "environ").read_bytes()
            ):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass(frozen=True)
class Mesh:
    data_dir: Path
    topology: Topology
    state: dict[str, Any]
    up: subprocess.CompletedProcess[str]

    def address(self, name: str) -> str:
        return next(c["address"] for c in self.state["components"] if c["name"] == name)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("mesh")
    result = tessera("up", data_dir=data_dir)
    try:
        assert result.returncode == 0, result.stderr
        state = json.loads((data_dir / "state.json").read_text())
        yield Mesh(data_dir=data_dir, topology=load(TOPOLOGY_FILE), state=state, up=result)
    finally:
        tessera("down", data_dir=data_dir)


def operator_channel(mesh: Mesh, name: str) -> grpc.aio.Channel:
    """An mTLS channel to component ``name`` with the operator's certificate."""
    operator = operator_identity(mesh.data_dir, mesh.address("openbao"))
    assert operator is not None
    return grpc.aio.secure_channel(
        mesh.address(name), operator.credentials(), options=operator.options_for(name)
    )


async def check(address: str, service: str) -> int:
    """Health through Envoy's public (plaintext, loopback) listener."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


async def test_up_brings_every_component_to_serving(mesh: Mesh) -> None:
    names = [c["name"] for c in mesh.state["components"]]
    assert names == ["nats", "openbao", *(s.name for s in mesh.topology.services), "envoy"]
    for spec in mesh.topology.services:
        assert spec.name in mesh.up.stdout
        async with operator_channel(mesh, spec.name) as channel:
            for name in spec.health:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=name), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_service_refuses_plaintext_and_callers_the_table_does_not_allow(
    mesh: Mesh,
) -> None:
    for spec in mesh.topology.services:
        async with grpc.aio.insecure_channel(mesh.address(spec.name)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, spec.name
    # A mesh identity the table does not list for the method: refused before the handler.
    async with operator_channel(mesh, "agent-billing") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ExecuteTask(agent_pb2.ExecuteTaskRequest(), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    refusal = error_details(denied.value)
    assert refusal.reason == "CALLER_NOT_ALLOWED"
    assert refusal.metadata["caller"] == "spiffe://tessera.local/service/operator"
    # An agent deciding a gate straight at the coordinator's port (bypassing Envoy).
    billing = local_identity(mesh.data_dir, mesh.address("openbao"), "agent-billing")
    assert billing is not None
    async with grpc.aio.secure_channel(
        mesh.address("coordinator"), billing.credentials(), billing.options_for("coordinator")
    ) as channel:
        coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as decide:
            await coordinator.DecideGate(
                coordinator_pb2.DecideGateRequest(name="workflows/x/gates/y"), timeout=5
            )
    assert decide.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(decide.value).metadata["caller"] == "spiffe://tessera.local/agent/billing"


async def test_reflection_lists_each_service(mesh: Mesh) -> None:
    for spec in mesh.topology.services:
        async with operator_channel(mesh, spec.name) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            listed: set[str] = set()
            async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
                listed |= {s.name for s in reply.list_services_response.service}
        assert set(spec.health) <= listed, (spec.name, listed)


async def test_health_check_through_the_gateway_reaches_the_coordinator(mesh: Mesh) -> None:
    coordinator = mesh.topology.service("coordinator")
    gateway = mesh.state["gateway"]
    for name in coordinator.health:
        assert await check(gateway, name) == health_pb2.HealthCheckResponse.SERVING
    assert await asyncio.to_thread(gateway_routed_health_check_to, mesh.data_dir, "coordinator")


@pytest.mark.parametrize(
    "method",
    [
        "/tessera.v1.AgentService/ExecuteTask",
        "/tessera.v1.PlannerService/Plan",
        "/tessera.v1.ToolProxyService/InvokeTool",
        "/tessera.v1.PolicyService/Check",
        # The registry's freeze switch is routed, its registration is not.
        "/tessera.v1.RegistryService/Register",
        "/tessera.v1.RegistryService/Deregister",
    ],
)
async def test_the_front_door_routes_only_the_public_api(mesh: Mesh, method: str) -> None:
    """Even a logged-in person reaches only the coordinator's API (and the registry's
    freeze switch) through Envoy."""
    token = ensure_login(mesh.data_dir, "requester").token
    async with grpc.aio.insecure_channel(mesh.state["gateway"]) as channel:
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as unrouted:
            await raw(b"", timeout=5, metadata=[("authorization", f"Bearer {token}")])
        assert unrouted.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await raw(b"", timeout=5)  # and nobody without a token gets that far
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def gateway_routed_health_check_to(data_dir: Path, cluster: str, timeout: float = 10.0) -> bool:
    """Whether Envoy's access log shows a health Check sent to ``cluster`` (polled)."""
    access_log = data_dir / "logs" / "envoy-access.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        for record in map(json.loads, lines):
            if record["path"] == "/grpc.health.v1.Health/Check" and (
                record["upstream_cluster"] == cluster
            ):
                return True
        time.sleep(0.05)
    return False


def test_status_shows_every_component_serving(mesh: Mesh) -> None:
    result = tessera("status", data_dir=mesh.data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    for component in mesh.state["components"]:
        line = next(line for line in result.stdout.splitlines() if f" {component['name']} " in line)
        assert "SERVING" in line and "NOT_SERVING" not in line, line


def test_a_second_up_says_already_running(mesh: Mesh) -> None:
    result = tessera("up", data_dir=mesh.data_dir)
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert "Traceback" not in result.stderr
    assert all(pid_alive(c["pid"]) for c in mesh.state["components"])


def test_root_token_stays_out_of_logs_and_command_lines(mesh: Mesh) -> None:
    token_file = mesh.data_dir / "secrets" / "root-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    for log in (mesh.data_dir / "logs").iterdir():
        assert token not in log.read_text(errors="replace"), log.name
    for component in mesh.state["components"]:
        assert token.encode() not in Path(f"/proc/{component['pid']}/cmdline").read_bytes()


def test_restart_kills_a_component_and_starts_the_same_command_again(mesh: Mesh) -> None:
    before = json.loads((mesh.data_dir / "run" / "agent-billing.pid").read_text())
    result = tessera("restart", "agent-billing", "--kill", data_dir=mesh.data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed" in result.stdout and "serving after" in result.stdout
    after = json.loads((mesh.data_dir / "run" / "agent-billing.pid").read_text())
    assert after["pid"] != before["pid"] and not pid_alive(before["pid"])
    assert after["argv"] == before["argv"] and after["env"] == before["env"]
    state = json.loads((mesh.data_dir / "state.json").read_text())
    assert (
        next(c["pid"] for c in state["components"] if c["name"] == "agent-billing")
        == (after["pid"])
    )
    status = tessera("status", data_dir=mesh.data_dir)
    assert status.returncode == 0, status.stdout
    # What a PID file keeps to restart with never includes a secret.
    token = (mesh.data_dir / "secrets" / "root-token").read_text().strip()
    for pid_file in (mesh.data_dir / "run").glob("*.pid"):
        assert token not in pid_file.read_text(), pid_file.name


def test_restart_refuses_an_unknown_component(mesh: Mesh) -> None:
    unknown = tessera("restart", "nosuch", data_dir=mesh.data_dir)
    assert unknown.returncode == 1 and "no component 'nosuch'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_openbao_restarted_alone_comes_back_unsealed_with_everything_it_held(mesh: Mesh) -> None:

    secrets_dir = mesh.data_dir / "secrets"
    root = (secrets_dir / "root-token").read_text().strip()
    addr = mesh.address("openbao")
    before = hvac.Client(url=addr, token=root).sys.list_auth_methods()["data"]
    assert "approle/" in before
    result = tessera("restart", "openbao", "--kill", data_dir=mesh.data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    client = hvac.Client(url=addr, token=root)
    assert not client.sys.read_seal_status()["sealed"]
    assert client.sys.list_auth_methods()["data"].keys() == before.keys()
    # The unseal key is local bootstrap material: private, and never in a log.
    key_file = secrets_dir / "openbao-unseal-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    for log in (mesh.data_dir / "logs").iterdir():
        assert key not in log.read_text(errors="replace"), log.name


def test_down_leaves_no_process_and_a_second_down_is_a_no_op(mesh: Mesh) -> None:
    result = tessera("down", data_dir=mesh.data_dir)
    assert result.returncode == 0, result.stderr
    assert not [c["name"] for c in mesh.state["components"] if pid_alive(c["pid"])]
    assert processes_mentioning(str(mesh.data_dir)) == []
    again = tessera("down", data_dir=mesh.data_dir)
    assert again.returncode == 0
    assert "nothing is running" in again.stdout
    status = tessera("status", data_dir=mesh.data_dir)
    assert status.returncode != 0


def test_a_taken_port_is_reported_by_name_and_number(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        result = tessera("up", "--base-port", str(port), data_dir=tmp_path)
    assert result.returncode != 0
    assert f"port {port} for nats is already in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert processes_mentioning(str(tmp_path)) == []


def test_a_service_that_fails_to_start_is_named_and_everything_is_stopped(tmp_path: Path) -> None:
    spec = yaml.safe_load(TOPOLOGY_FILE.read_text())
    spec["services"][-1]["module"] = "tessera_no_such_module"
    broken = tmp_path / "topology.yaml"
    broken.write_text(yaml.safe_dump(spec))
    data_dir = tmp_path / "data"
    result = tessera("up", data_dir=data_dir, topology=broken)
    assert result.returncode != 0
    name = spec["services"][-1]["name"]
    assert f"{name} exited" in result.stderr
    assert "No module named tessera_no_such_module" in result.stderr  # the log tail
    assert "Traceback (most recent call last)" not in result.stdout
    assert not (data_dir / "state.json").exists()
    assert processes_mentioning(str(data_dir)) == []


def test_a_partly_dead_previous_run_is_cleaned_up_and_restarted(tmp_path: Path) -> None:
    first = tessera("up", data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    try:
        state = json.loads((tmp_path / "state.json").read_text())
        victim = next(c for c in state["components"] if c["kind"] == "service")
        os.killpg(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(victim["pid"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)

        status = tessera("status", data_dir=tmp_path)
        assert status.returncode == 1
        line = next(x for x in status.stdout.splitlines() if f" {victim['name']} " in x)
        assert "DOWN" in line

        second = tessera("up", data_dir=tmp_path)
        assert second.returncode == 0, second.stderr
        assert "previous run" in second.stderr
        assert not [c["name"] for c in state["components"] if pid_alive(c["pid"])]
        assert tessera("status", data_dir=tmp_path).returncode == 0
    finally:
        tessera("down", data_dir=tmp_path)
    assert processes_mentioning(str(tmp_path)) == []
