"""The whole mesh as `tessera up` runs it: the demo through the Envoy gateway, the audit
trail verifying afterwards, and a workflow parked on approval surviving `tessera down`
and `tessera up`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.cli.login import ensure_login
from tessera.client import MeshClient
from tessera.v1 import coordinator_pb2
from tests.integration.test_mesh_up import CLI_TIMEOUT_S, PROJECT_ROOT, tessera

WS = coordinator_pb2.WorkflowState


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("mesh-workflows")
    result = tessera("up", data_dir=directory)
    try:
        assert result.returncode == 0, result.stderr
        yield directory
    finally:
        tessera("down", data_dir=directory)


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """A command that finds the mesh the way a user's shell does (TESSERA_DATA_DIR)."""
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        cwd=PROJECT_ROOT,
        env={**os.environ, "TESSERA_DATA_DIR": str(data_dir), "COLUMNS": "200"},
    )


def gateway(data_dir: Path) -> str:
    return str(json.loads((data_dir / "state.json").read_text())["gateway"])


def person(data_dir: Path, user: str) -> MeshClient:
    """A client of the gateway logged in as ``user`` (vault/humans.yaml)."""
    return MeshClient(gateway(data_dir), token=ensure_login(data_dir, user).token)


def test_demo_runs_every_reference_workflow_through_the_gateway(data_dir: Path) -> None:
    demo = cli("demo", data_dir=data_dir)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-2000:]
    assert "6/6 workflows ended as expected" in demo.stdout
    assert "started by requester" in demo.stdout
    verify = cli("audit", "verify", data_dir=data_dir)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verify (signatures checked)" in verify.stdout  # keys from the mesh's OpenBao
    # Who approved what, by the names the front door verified (the demo's approvers).
    decisions = verify.stdout.split("gate decisions", 1)[1]
    assert "finance" in decisions and "compliance" in decisions, verify.stdout[-3000:]
    assert "requester" not in decisions  # nobody decides their own workflow's gates


def test_cancel_is_the_starters_or_an_operators_and_refused_to_others(data_dir: Path) -> None:
    started = cli(
        "run",
        "loan",
        "--no-wait",
        "--as",
        "requester",
        "-i",
        'application={"applicant":"Initrode","amount":5000,"country":"XX"}',
        data_dir=data_dir,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    name = started.stdout.split()[0]
    assert name.startswith("workflows/"), started.stdout
    ensure_login(data_dir, "finance")
    refused = cli("cancel", name, "--as", "finance", data_dir=data_dir)
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr, refused.stderr
    ok = cli("cancel", name, "--as", "requester", "--reason", "withdrawn", data_dir=data_dir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "cancelling" in ok.stdout


def test_people_in_operators_freeze_an_agent_through_the_gateway_and_nobody_else(
    data_dir: Path,
) -> None:
    """The kill switch for one agent, as a person pulls it: through Envoy (token verified,
    claims forwarded over its mTLS connection), decided by the registry's policy."""
    for user in ("oncall", "finance"):
        ensure_login(data_dir, user)
    refused = cli("agents", "freeze", "technical", "--as", "finance", data_dir=data_dir)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "PERMISSION_DENIED (ACTION_NOT_ALLOWED)" in refused.stderr, refused.stderr
    try:
        frozen = cli(
            "agents", "freeze", "technical", "--as", "oncall", "-r", "drill", data_dir=data_dir
        )
        assert frozen.returncode == 0, frozen.stdout + frozen.stderr
        assert "technical frozen by oncall" in frozen.stdout, frozen.stdout
        listed = cli("agents", "frozen", "--as", "oncall", data_dir=data_dir)
        assert listed.returncode == 0, listed.stderr
        assert "oncall" in listed.stdout and "drill" in listed.stdout, listed.stdout
        registered = cli("agents", data_dir=data_dir)  # the operator's view of the registry
        assert registered.returncode == 0, registered.stderr
        # Its replicas left the registry (support.technical is its capability alone).
        assert "support.technical" not in registered.stdout, registered.stdout
    finally:
        lifted = cli("agents", "unfreeze", "technical", "--as", "oncall", data_dir=data_dir)
    assert lifted.returncode == 0 and "technical unfrozen" in lifted.stdout, lifted.stderr
    # On the registry's chain: finance's refusal, oncall's allowed decision and the
    # freeze itself, each before anything changed.
    trail = cli("audit", "tail", "-n", "400", data_dir=data_dir).stdout.splitlines()
    mine = [line.split()[2:5] for line in trail if "technical" in line]
    assert ["policy_decision", "deny", "agent"] in mine, mine
    assert ["agent_freeze", "frozen", "registry/agent/technical"] in mine, mine
    assert ["agent_freeze", "unfrozen", "registry/agent/technical"] in mine, mine


async def test_a_parked_workflow_survives_down_and_up(data_dir: Path) -> None:
    async with person(data_dir, "requester") as client:
        workflow = await client.start(
            "loan",
            application={
                "applicant": "Initech",
                "amount": 90000,
                "country": "KP",
                "tax_id": "TIN-42",
            },
        )
        async for event in client.watch(workflow.name):
            if event.HasField("gate_opened"):
                gate = f"{workflow.name}/gates/{event.gate_opened.gate_id}"
                break
        else:
            pytest.fail("the loan never parked on its AML gate")

    assert tessera("down", data_dir=data_dir).returncode == 0
    up = tessera("up", data_dir=data_dir)
    assert up.returncode == 0, up.stderr

    async with person(data_dir, "requester") as client, person(data_dir, "compliance") as officer:
        parked = await client.get(workflow.name)
        assert parked.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
        assert parked.started_by == "requester"
        decided = await officer.decide(gate, approve=True)
        assert decided.decided_by == "compliance"  # the verified person, not a typed name
        async for _ in client.watch(workflow.name):
            pass
        final = await client.get(workflow.name)
    assert final.state == WS.WORKFLOW_STATE_SUCCEEDED
    assert [t.state for t in final.tasks].count(coordinator_pb2.TASK_STATE_SUCCEEDED) == 3
