"""Clients in other languages, generated from proto/ by buf with LOCAL plugins only, drive a
real mesh brought up with the real CLI (`tessera up --data-dir <tmp>`) through Envoy.

- Node.js: `npm ci` in clients/node (so a fresh machine works), `buf generate --template
  clients/node/buf.gen.yaml` (protoc-gen-es from node_modules), then clients/node/workflow.mjs
  starts `loan`, approves its AML gate and watches it to SUCCEEDED. Skipped only when the
  machine has no `node`/`npm`.
- Go: clients/go/build.sh generates with Debian's protoc-gen-go(-grpc) and builds offline
  against /usr/share/gocode (GOPATH mode), then the binary runs the same flow. Skipped,
  with the apt-get line, when Debian's Go toolchain/libraries are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tessera.cli.login import ensure_login
from tessera.launcher.topology import project_root

PROJECT_ROOT = project_root(Path(__file__).parent)
NODE_DIR = PROJECT_ROOT / "clients" / "node"
GO_BUILD = PROJECT_ROOT / "clients" / "go" / "build.sh"
GO_BINARY = PROJECT_ROOT / ".build" / "go" / "workflow"
BUF = Path(sys.executable).parent / "buf"
CLI_TIMEOUT_S = 90

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


def tessera(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The real `tessera` command line, as a user runs it."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("TESSERA_DATA_DIR", None)
    cli = Path(sys.executable).parent / "tessera"
    return subprocess.run(
        [str(cli), *args, "--data-dir", str(data_dir)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`tessera up` in a temporary data dir."""
    data_dir = tmp_path_factory.mktemp("polyglot-mesh")
    try:
        up = tessera("up", data_dir=data_dir)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-4000:]
        yield data_dir
    finally:
        tessera("down", data_dir=data_dir)


@pytest.fixture(scope="module")
def gateway(mesh_dir: Path) -> str:
    """The gateway address from state.json."""
    return str(json.loads((mesh_dir / "state.json").read_text())["gateway"])


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


@pytest.mark.skipif(NO_NODE, reason="node and npm are not installed on this machine")
def test_node_client_runs_the_loan_workflow_through_the_gateway(
    gateway: str, tokens: dict[str, str]
) -> None:
    install = run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    plugin = NODE_DIR / "node_modules" / ".bin" / "protoc-gen-es"
    assert plugin.exists()

    deps = run([sys.executable, "tools/proto_deps.py", ".build/protodeps"])
    assert deps.returncode == 0, deps.stderr
    generate = run([str(BUF), "generate", "--template", "clients/node/buf.gen.yaml"])
    assert generate.returncode == 0, generate.stdout + generate.stderr
    assert (NODE_DIR / "gen" / "tessera" / "v1" / "coordinator_pb.js").exists()

    client = run(["node", "workflow.mjs", gateway], cwd=NODE_DIR, timeout=60, **tokens)
    output = client.stdout + client.stderr
    assert client.returncode == 0, output
    records = json_lines(client.stdout)
    assert records[0]["started"].startswith("workflows/"), output
    assert any(r.get("decision") == "APPROVE" for r in records), output
    assert_loan_flow(records, output)


@pytest.mark.skipif(
    bool(GO_MISSING),
    reason=f"Debian's Go toolchain is not installed (missing {', '.join(GO_MISSING)}); "
    "clients/go/build.sh prints the apt-get line",
)
def test_go_client_builds_offline_and_runs_the_loan_workflow(
    gateway: str, tokens: dict[str, str]
) -> None:
    build = run(["bash", str(GO_BUILD)], timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert GO_BINARY.exists()

    client = run([str(GO_BINARY), gateway], timeout=60, **tokens)
    output = client.stdout + client.stderr
    assert client.returncode == 0, output
    records = json_lines(client.stdout)
    assert any(r.get("decision") == "APPROVE" for r in records), output
    assert_loan_flow(records, output)
