"""The launcher's building blocks against real processes and the real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import hvac
import nats
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.js.api import StorageType

from tessera.launcher import processes
from tessera.launcher.binaries import find_binary
from tessera.launcher.gateway import Upstream, render
from tessera.launcher.infra import EnvoyServer
from tessera.launcher.ports import PortInUse, ensure_free, free_port
from tessera.launcher.processes import StopResult
from tessera.launcher.topology import load, project_root
from tests.conftest import OpenBao

PROJECT_ROOT = project_root(Path(__file__).parent)
COORDINATOR = "tessera.v1.CoordinatorService"


def wait_for_line(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.02)


# --- infrastructure fixtures -------------------------------------------------------------


async def test_nats_has_jetstream_with_file_storage(nats_url: str, namespace: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=namespace, subjects=[f"{namespace}.>"])
        ack = await js.publish(f"{namespace}.hello", b"x")
        assert ack.stream == namespace and ack.seq == 1
        info = await js.stream_info(namespace)
        assert info.config.storage == StorageType.FILE
        await js.delete_stream(namespace)
    finally:
        await nc.close()


def test_openbao_root_token_authenticates(openbao: OpenBao) -> None:
    client = hvac.Client(url=openbao.addr, token=openbao.root_token)
    assert client.is_authenticated()
    assert client.sys.read_health_status(method="GET")["sealed"] is False
    assert openbao.root_token not in repr(openbao)


def test_namespaces_are_unique(namespace: str) -> None:
    assert namespace.startswith("t") and len(namespace) == 9 and namespace.isalnum()


@pytest.fixture
async def coordinator_stand_in() -> AsyncIterator[str]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set(COORDINATOR, health_pb2.HealthCheckResponse.SERVING)
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_gateway_routes_grpc_by_service_name_and_limits_size(
    envoy_factory: Callable[..., EnvoyServer], coordinator_stand_in: str
) -> None:
    gateway = envoy_factory(
        [Upstream("coordinator", coordinator_stand_in, (COORDINATOR,))],
        health_upstream="coordinator",
    )
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=COORDINATOR), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        unknown = channel.unary_unary("/tessera.v1.NoSuchService/Get")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await unknown(b"", timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED

        huge = health_pb2.HealthCheckRequest(service="x" * (5 * 1024 * 1024))
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stub.Check(huge, timeout=5)
        assert too_big.value.code() == grpc.StatusCode.UNKNOWN, too_big.value  # HTTP 413
    # The oversized call was refused by Envoy itself and never reached the upstream.
    records = await asyncio.to_thread(access_log, Path(gateway.access_log), 3)
    oversized = records[-1]
    assert oversized["upstream_host"] is None
    assert oversized["details"] == "request_payload_too_large"
    assert records[1]["response_flags"] == "NR"  # no route for an unknown service


def access_log(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """The first ``count`` access log records (Envoy flushes them every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def test_rendered_gateway_config_is_valid_for_the_installed_envoy(tmp_path: Path) -> None:
    topology = load(PROJECT_ROOT / "deploy/local/topology.yaml")
    upstreams = [
        Upstream(s.name, f"127.0.0.1:{50051 + i}", s.health)
        for i, s in enumerate(topology.services)
        if s.public
    ]
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render(
            PROJECT_ROOT / "gateway",
            listen_port=8080,
            admin_port=9901,
            access_log=tmp_path / "access.log",
            upstreams=upstreams,
            health_upstream="coordinator",
        )
    )
    result = subprocess.run(
        [str(find_binary("envoy")), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


# --- processes and ports -----------------------------------------------------------------


def test_stop_escalates_to_sigkill_and_removes_the_pid_file(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    record = processes.spawn(tmp_path, "stubborn", [sys.executable, "-c", stubborn])
    wait_for_line(Path(record.log_path), "ready")
    assert processes.stop(tmp_path, "stubborn", timeout=0.3) is StopResult.KILLED
    assert not processes.pid_exists(record.pid)
    assert not processes.pid_file(tmp_path, "stubborn").exists()
    assert processes.stop(tmp_path, "stubborn") is StopResult.NOT_RUNNING


def test_a_pid_file_of_a_dead_process_is_cleaned_up(tmp_path: Path) -> None:
    record = processes.spawn(tmp_path, "brief", [sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while processes.pid_exists(record.pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert processes.stop(tmp_path, "brief") is StopResult.STALE
    assert processes.recorded_names(tmp_path) == []


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    record = processes.spawn(
        tmp_path, "other", [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    try:
        # Pretend the PID file was written for a different program that now has this PID.
        forged = dataclasses.replace(record, argv=(sys.executable, "-m", "services.coordinator"))
        processes.pid_file(tmp_path, "other").write_text(json.dumps(dataclasses.asdict(forged)))
        assert processes.stop(tmp_path, "other") is StopResult.STALE
        assert processes.pid_exists(record.pid)
    finally:
        processes.pid_file(tmp_path, "other").write_text(json.dumps(dataclasses.asdict(record)))
        assert processes.stop(tmp_path, "other") is StopResult.STOPPED


def test_ensure_free_names_the_component_and_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUse, match=f"^port {port} for nats is already in use$"):
            ensure_free("nats", port)
    ensure_free("nats", port)
