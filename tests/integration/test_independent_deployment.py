"""A team ships an agent on its own: nothing in the running mesh restarts.

`tessera up` (the real CLI: NATS, OpenBao, the services, the gateway control plane and
Envoy) runs the core services and one reference agent. A new agent process offering a
capability nobody used (`translate.text`) gets its own identity (one line in
vault/identities.yaml and `tessera vault bootstrap`), is started beside it with that
AppRole, registers, the planner validates a plan that uses it against the live registry,
and a workflow started through Envoy completes with it over mTLS. Envoy does not route to
it from outside (only the coordinator's public API). On SIGTERM it deregisters: the same
plan is refused by planning (INVALID_ARGUMENT naming the capability). Every process
`tessera up` started keeps its PID.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import duration_pb2, struct_pb2

from tessera.cli._local import nats_options
from tessera.cli.login import ensure_login
from tessera.launcher.topology import project_root
from tessera.runtime.bus import connect
from tessera.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    planner_pb2,
)
from tests.integration.agents.process import AgentProcess
from tests.integration.harness import TERMINAL, WS
from tests.integration.test_mesh_up import tessera

PROJECT_ROOT = project_root(Path(__file__).parent)
CORE = ("policy", "planner", "tool-proxy", "registry", "coordinator", "gateway-control-plane")
BYSTANDER = "agent-billing"  # a reference agent that must not notice anything
OPERATOR_ON_CALL = "oncall"  # vault/humans.yaml: operators start plans of their own


def bearer(mesh: RunningMesh) -> tuple[tuple[str, str], ...]:
    """The identity token the gateway wants on every call, of a logged-in person."""
    return (("authorization", f"Bearer {ensure_login(mesh.data_dir, OPERATOR_ON_CALL).token}"),)


@dataclass(frozen=True)
class RunningMesh:
    data_dir: Path
    state: dict[str, Any]

    def address(self, name: str) -> str:
        return str(next(c["address"] for c in self.state["components"] if c["name"] == name))

    @property
    def gateway(self) -> str:
        return str(self.state["gateway"])

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.state['ports']['gateway-admin']}"

    def pids(self) -> dict[str, int]:
        return {c["name"]: int(c["pid"]) for c in self.state["components"]}


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[RunningMesh]:
    full = yaml.safe_load((PROJECT_ROOT / "deploy/local/topology.yaml").read_text())
    services = [s for s in full["services"] if s["name"] in (*CORE, BYSTANDER)]
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump({"services": services}))
    data_dir = tmp_path / "mesh"
    try:
        up = await asyncio.to_thread(tessera, "up", data_dir=data_dir, topology=topology)
        assert up.returncode == 0, up.stderr
        yield RunningMesh(data_dir, json.loads((data_dir / "state.json").read_text()))
    finally:
        down = await asyncio.to_thread(tessera, "down", data_dir=data_dir, topology=topology)
        assert down.returncode == 0, down.stderr


def _envoy_clusters(admin_url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{admin_url}/clusters", timeout=2) as response:
        return str(response.read().decode())


def _plan(text: str) -> planner_pb2.TaskGraph:
    task_input = struct_pb2.Struct()
    task_input.update({"text": text})
    return planner_pb2.TaskGraph(
        template="translation",
        budget=common_pb2.Budget(
            max_tokens=100, max_cost_micros=100, max_tool_calls=1, max_iterations=5
        ),
        tasks=[
            planner_pb2.TaskSpec(
                id="translate",
                capability="translate.text",
                version="^1.0",
                input=task_input,
                timeout=duration_pb2.Duration(seconds=10),
            )
        ],
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_an_agent_deployed_on_its_own_joins_and_leaves_without_restarts(
    mesh: RunningMesh, tmp_path: Path
) -> None:
    before = mesh.pids()
    assert BYSTANDER in before and "envoy" in before
    clusters = await asyncio.to_thread(_envoy_clusters, mesh.admin_url)
    assert "\ncoordinator::" in f"\n{clusters}"  # the control plane feeds Envoy live
    assert f"\n{BYSTANDER}::" not in f"\n{clusters}"  # agents are not routed from outside

    auth = bearer(mesh)
    async with grpc.aio.insecure_channel(mesh.gateway) as gateway:  # everything via Envoy
        coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(gateway)

        async def start(text: str) -> str:
            request = coordinator_pb2.StartWorkflowRequest(
                request_id=uuid.uuid4().hex, plan=_plan(text)
            )
            response = await coordinator.StartWorkflow(request, timeout=15, metadata=auth)
            return response.workflow.name

        with pytest.raises(grpc.aio.AioRpcError) as before_deploy:
            await start("not yet")
        assert before_deploy.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "translate.text" in (before_deploy.value.details() or "")

        # A new agent gets its own identity the documented way: one line in
        # vault/identities.yaml, then `tessera vault bootstrap` against the running mesh.
        vault_dir = tmp_path / "vault"
        shutil.copytree(PROJECT_ROOT / "vault", vault_dir)
        identities = yaml.safe_load((vault_dir / "identities.yaml").read_text())
        identities["agents"].append({"name": "translator"})
        (vault_dir / "identities.yaml").write_text(yaml.safe_dump(identities))
        applied = await asyncio.to_thread(
            tessera, "vault", "bootstrap", "--vault-dir", str(vault_dir), data_dir=mesh.data_dir
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        approle = mesh.data_dir / "secrets" / "agent-translator.approle.json"
        assert approle.stat().st_mode & 0o777 == 0o600

        nc = await connect(
            mesh.address("nats"), name="test", **nats_options(mesh.data_dir)
        )  # the operator: NATS admits only certificates of the mesh CA
        translator = AgentProcess(
            "translator",
            "translator",
            nats_url=mesh.address("nats"),
            namespace="tessera",
            registry_address=mesh.address("registry"),
            log_dir=tmp_path / "agents",
            extra_env={
                "TESSERA_VAULT_ADDR": mesh.address("openbao"),
                "TESSERA_VAULT_APPROLE_FILE": str(approle),
                "TESSERA_INSECURE_PLAINTEXT": "0",
            },
        )
        try:
            descriptor = await translator.registered(nc)
            assert [c.name for c in descriptor.capabilities] == ["translate.text"]

            # Planned against the live registry, run, and answered through Envoy.
            name = await start("hello independent world")
            workflow = await _terminal(coordinator, name, within=30, metadata=auth)
            assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow.error
            assert dict(workflow.blackboard)["translation"] == "WORLD INDEPENDENT HELLO"

            # From outside, Envoy routes only the public API: the agent is not reachable.
            agent = agent_pb2_grpc.AgentServiceStub(gateway)
            with pytest.raises(grpc.aio.AioRpcError) as unrouted:
                await agent.Describe(
                    agent_pb2.DescribeRequest(),
                    timeout=5,
                    metadata=(*auth, ("x-tessera-agent", "translator")),
                )
            assert unrouted.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "\nagent-translator::" not in f"\n{_envoy_clusters(mesh.admin_url)}"

            assert await translator.terminate() == 0  # deregisters, drains, exits
        finally:
            translator.kill()
            await nc.close()

        with pytest.raises(grpc.aio.AioRpcError) as after_stop:
            await start("too late")
        assert after_stop.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "translate.text" in (after_stop.value.details() or "")

    after = json.loads((mesh.data_dir / "state.json").read_text())
    assert {c["name"]: int(c["pid"]) for c in after["components"]} == before
    assert all(_alive(pid) for pid in before.values()), before


async def _terminal(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    name: str,
    *,
    within: float,
    metadata: tuple[tuple[str, str], ...],
) -> coordinator_pb2.Workflow:
    deadline = time.monotonic() + within
    while True:
        workflow = (
            await stub.GetWorkflow(
                coordinator_pb2.GetWorkflowRequest(name=name), timeout=5, metadata=metadata
            )
        ).workflow
        if workflow.state in TERMINAL:
            return workflow
        if time.monotonic() >= deadline:
            raise AssertionError(f"{name} is {WS.Name(workflow.state)} after {within}s")
        await asyncio.sleep(0.1)
