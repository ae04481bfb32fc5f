"""Clients in other languages, generated from proto/ by buf with LOCAL plugins only, drive a
real mesh brought up with the real CLI (`tessera up --data-dir <tmp>`) through Envoy.

- Node.js: `npm ci` in clients/node (so a fresh machine works), `buf generate --template
  clients/node/buf.gen.yaml` (protoc-gen-es from node_modules), then clients/node/workflow.mjs
  starts `loan`, approves its AML gate and watches it to SUCCEEDED. Skipped only when the
  machine has no `node`/`npm`.
- Go: clients/go/build.sh generates with Debian's protoc-gen-go(-grpc) and builds offline
  against /usr/share/gocode (GOPATH mode), then the binary runs the same flow. Skipped,
  with the apt-get line, when Debian's Go toolchain/libraries are not installed.
- Agents in Node.js (clients/node/agent.mjs) and Go (clients/go/agent), from proto/ and
  docs/agents-any-language.md alone, each serve the support workflow's technical task
  beside the Python agents: own certificate, registration, mTLS both ways, a governed tool
  call with the task token.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tessera.cli._local import nats_options, nats_url
from tessera.cli.login import ensure_login
from tessera.client import MeshClient
from tessera.launcher import processes
from tessera.v1 import coordinator_pb2
from tests.end_of_run import check_executions, read_stored
from tests.integration.mesh_cli import PROJECT_ROOT, gateway_address, mesh_up

NODE_DIR = PROJECT_ROOT / "clients" / "node"
GO_BUILD = PROJECT_ROOT / "clients" / "go" / "build.sh"
GO_BINARY = PROJECT_ROOT / ".build" / "go" / "workflow"
GO_AGENT = PROJECT_ROOT / ".build" / "go" / "agent"
BUF = Path(sys.executable).parent / "buf"

EVENT_COMMON = {"eventId", "workflowId", "sequence", "time", "causationId"}
GOCODE = Path("/usr/share/gocode/src")

NO_NODE = shutil.which("node") is None or shutil.which("npm") is None
GO_MISSING = [t for t in ("go", "protoc-gen-go", "protoc-gen-go-grpc") if not shutil.which(t)] + [
    str(GOCODE / p)
    for p in ("google.golang.org/grpc", "google.golang.org/protobuf", "google.golang.org/genproto")
    if not (GOCODE / p).is_dir()
]


def run(
    args: list[str], *, cwd: Path = PROJECT_ROOT, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`tessera up` in a temporary data dir."""
    with mesh_up(tmp_path_factory.mktemp("polyglot-mesh")) as data_dir:
        yield data_dir


@pytest.fixture(scope="module")
def gateway(mesh_dir: Path) -> str:
    return gateway_address(mesh_dir)


@pytest.fixture(scope="module")
def tokens(mesh_dir: Path) -> dict[str, str]:
    """What a client in any language is given: the requester's identity token, and a
    compliance officer's for the AML gate."""
    return {
        "TESSERA_TOKEN": ensure_login(mesh_dir, "requester").token,
        "TESSERA_APPROVER_TOKEN": ensure_login(mesh_dir, "compliance").token,
    }


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def assert_loan_flow(records: list[dict[str, Any]], output: str) -> None:
    """Events streamed in order: the AML gate opened, was approved by us, the workflow
    completed, and the final read says SUCCEEDED."""
    events = [r["event"] for r in records if "event" in r]
    kinds = [next(k for k in e if k not in EVENT_COMMON) for e in events]  # the oneof case
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1)), output
    assert kinds[0] == "workflowStarted", output
    opened = next(e["gateOpened"] for e in events if "gateOpened" in e)
    assert opened["gateId"] == "compliance-approval" and "AML" in opened["reason"], output
    decided = next(e["gateDecided"] for e in events if "gateDecided" in e)
    assert decided["gateId"] == "compliance-approval" and decided["approved"] is True, output
    assert decided["decidedBy"] == "compliance", output  # the verified officer, by name
    assert (
        kinds.index("gateOpened") < kinds.index("gateDecided") < kinds.index("workflowCompleted")
    ), output
    assert kinds[-1] == "workflowCompleted", output
    assert records[-1]["state"] == "WORKFLOW_STATE_SUCCEEDED", output


@pytest.fixture(scope="module")
def node_code() -> Path:
    """clients/node with its pinned packages (`npm ci`) and the code buf generates from
    proto/ with the local protoc-gen-es. Without node/npm: skipped, except where
    ``TESSERA_REQUIRE_TOOLCHAINS=1`` (CI, whose `.ci/run` installs them) makes it fail."""
    if NO_NODE:
        if os.environ.get("TESSERA_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail("node and npm are required here (TESSERA_REQUIRE_TOOLCHAINS=1)")
        pytest.skip("node and npm are not installed on this machine")
    install = run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    plugin = NODE_DIR / "node_modules" / ".bin" / "protoc-gen-es"
    assert plugin.exists()

    deps = run([sys.executable, "tools/proto_deps.py", ".build/protodeps"])
    assert deps.returncode == 0, deps.stderr
    generate = run([str(BUF), "generate", "--template", "clients/node/buf.gen.yaml"])
    assert generate.returncode == 0, generate.stdout + generate.stderr
    assert (NODE_DIR / "gen" / "tessera" / "v1" / "coordinator_pb.js").exists()
    return NODE_DIR


def test_node_client_runs_the_loan_workflow_through_the_gateway(
    gateway: str, tokens: dict[str, str], node_code: Path
) -> None:
    client = run(["node", "workflow.mjs", gateway], cwd=node_code, timeout=60, **tokens)
    output = client.stdout + client.stderr
    assert client.returncode == 0, output
    records = json_lines(client.stdout)
    assert records[0]["started"].startswith("workflows/"), output
    assert any(r.get("decision") == "APPROVE" for r in records), output
    assert_loan_flow(records, output)


@pytest.fixture(scope="module")
def go_binaries() -> Path:
    """clients/go built offline from Debian's packages (clients/go/build.sh): the client and
    the agent. Without them: skipped, except where ``TESSERA_REQUIRE_TOOLCHAINS=1``."""
    if GO_MISSING:
        reason = (
            f"Debian's Go toolchain is not installed (missing {', '.join(GO_MISSING)}); "
            "clients/go/build.sh prints the apt-get line"
        )
        if os.environ.get("TESSERA_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    build = run(["bash", str(GO_BUILD)], timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert GO_BINARY.exists() and GO_AGENT.exists()
    return GO_BINARY.parent


def test_go_client_builds_offline_and_runs_the_loan_workflow(
    gateway: str, tokens: dict[str, str], go_binaries: Path
) -> None:
    client = run([str(GO_BINARY), gateway], timeout=60, **tokens)
    output = client.stdout + client.stderr
    assert client.returncode == 0, output
    records = json_lines(client.stdout)
    assert any(r.get("decision") == "APPROVE" for r in records), output
    assert_loan_flow(records, output)


def test_node_agent_serves_a_governed_workflow_beside_python_agents(
    mesh_dir: Path, gateway: str, node_code: Path
) -> None:
    """clients/node/agent.mjs stands in for the Python `technical` agent."""
    serves_the_technical_task(mesh_dir, gateway, ["node", "agent.mjs"], node_code, "[node agent]")


def test_go_agent_serves_a_governed_workflow_beside_python_agents(
    mesh_dir: Path, gateway: str, go_binaries: Path
) -> None:
    """clients/go/agent stands in for the Python `technical` agent."""
    serves_the_technical_task(mesh_dir, gateway, [str(GO_AGENT)], go_binaries, "[go agent]")


def serves_the_technical_task(
    mesh_dir: Path, gateway: str, argv: list[str], cwd: Path, marker: str
) -> None:
    """An agent written from proto/ and docs/agents-any-language.md alone takes the support
    workflow's technical task: it gets its certificate with the `technical` agent's
    AppRole, registers, takes the task from the coordinator (mTLS both ways) and searches
    the knowledge base through the tool proxy with the task token. The workflow's other
    agents stay Python (the Python `technical` replica steps aside)."""
    state = json.loads((mesh_dir / "state.json").read_text())
    address = {c["name"]: c["address"] for c in state["components"]}
    assert processes.stop(mesh_dir, "agent-technical") is not None
    agent = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "TESSERA_VAULT_ADDR": address["openbao"],
            "TESSERA_VAULT_APPROLE_FILE": str(
                mesh_dir / "secrets" / "agent-technical.approle.json"
            ),
            "TESSERA_REGISTRY_ADDRESS": address["registry"],
        },
    )
    try:
        assert agent.stdout is not None
        ready, _, _ = select.select([agent.stdout], [], [], 60)  # its first line: registered
        assert ready, "the agent did not register within 60 s"
        line = agent.stdout.readline()
        registered = json.loads(line) if line.startswith("{") else {"output": line}
        assert registered.get("registered") == "technical", registered

        token = ensure_login(mesh_dir, "requester").token
        ticket = {"id": "T-55", "customer_id": "C-5", "text": "the app crashes on start"}
        workflow = asyncio.run(_run_to_end(gateway, token, "support", ticket=ticket))
    finally:
        agent.terminate()
        agent.wait(timeout=15)
    assert workflow.state == coordinator_pb2.WORKFLOW_STATE_SUCCEEDED, workflow
    technical = next(t for t in workflow.tasks if t.capability == "support.technical")
    assert technical.agent == registered["instance_id"]  # answered by this agent
    assert marker in workflow.blackboard["technical_notes"]
    assert workflow.blackboard["category"] == "technical"  # triage, a Python agent

    # On the record: the tool ran once, under its allow decision, and the trail verifies.
    wf_id = workflow.name.split("/")[1]
    stored = asyncio.run(
        read_stored(
            nats_url("nats://127.0.0.1:4222", mesh_dir),
            "tessera",
            {wf_id},
            nats_options=nats_options(mesh_dir),
        )
    )
    searches = [r for r in stored.records if r.actor == "tool-proxy" and r.resource == "kb.search"]
    assert [r.outcome for r in searches].count("executed") == 1, searches
    assert check_executions(stored, unfinished_allowed=0) >= 1
    assert stored.report.ok, stored.report


async def _run_to_end(
    gateway: str, token: str, goal: str, **inputs: Any
) -> coordinator_pb2.Workflow:
    async with MeshClient(gateway, token=token) as client:
        started = await client.start(goal, **inputs)
        async with asyncio.timeout(90):
            async for _ in client.watch(started.name):
                pass
        return await client.get(started.name)
