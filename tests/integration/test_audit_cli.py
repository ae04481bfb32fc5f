"""`tessera audit verify` / `tail` against a real NATS: exit codes and readable output."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessera.audit import AuditWriter
from tessera.cli.audit import EXIT_TAMPERED, EXIT_UNAVAILABLE, app
from tessera.runtime.bus import Topology, connect, declare
from tessera.v1 import audit_pb2


async def _seed(nats_url: str, namespace: str, *, tamper: bool) -> None:
    nc = await connect(nats_url, name="test-seed")
    try:
        js = nc.jetstream()
        topology = Topology(namespace)
        await declare(js, topology)
        writer = AuditWriter(js, topology, writer="proxy-1", actor="tool-proxy")
        await writer.start()
        # Rides on the first record below (AuditRecord.carried).
        writer.defer(
            audit_pb2.AUDIT_KIND_TOOL_CALL,
            workflow_id="wf-9",
            outcome="executed",
            resource="kb.search",
        )
        for tool in ("crm.lookup_customer", "billing.issue_refund", "email.send"):
            await writer.append(
                audit_pb2.AUDIT_KIND_TOOL_CALL,
                workflow_id="wf-9",
                outcome="executed",
                resource=tool,
            )
        if tamper:
            # The stream refuses deletes: the tamperer appends an edited copy of record 2.
            last = await js.get_last_msg(topology.audit_stream, writer.subject)
            edited = audit_pb2.AuditRecord.FromString(last.data or b"")
            edited.resource = "billing.issue_refund"
            await js.publish(writer.subject, edited.SerializeToString())
    finally:
        await nc.close()


@pytest.fixture
def env(nats_url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    # No local mesh (so no Vault to fetch public keys from): hashes only, with a warning.
    return {
        "TESSERA_NATS_URL": nats_url,
        "TESSERA_NAMESPACE": namespace,
        "TESSERA_DATA_DIR": str(tmp_path / "no-mesh"),
    }


def test_verify_intact_then_tampered(nats_url: str, namespace: str, env: dict[str, str]) -> None:
    asyncio.run(_seed(nats_url, namespace, tamper=False))
    ok = CliRunner().invoke(app, ["verify"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "3 records (carrying 1 more) in 1 chain(s) verify" in ok.output

    asyncio.run(_seed(nats_url, namespace, tamper=True))
    bad = CliRunner().invoke(app, ["verify"], env=env)
    assert bad.exit_code == EXIT_TAMPERED
    assert "modified" in bad.output and "duplicate" in bad.output


def test_tail_prints_readable_lines(nats_url: str, namespace: str, env: dict[str, str]) -> None:
    asyncio.run(_seed(nats_url, namespace, tamper=False))
    result = CliRunner().invoke(app, ["tail", "-n", "2"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "proxy-1" in lines[0] and "tool_call" in lines[0] and "billing.issue_refund" in lines[0]
    assert "wf-9" in lines[1] and "email.send" in lines[1]


def test_unreachable_nats_exits_2() -> None:
    env = {"TESSERA_NATS_URL": "nats://127.0.0.1:1", "TESSERA_NAMESPACE": "x"}
    result = CliRunner().invoke(app, ["verify"], env=env)
    assert result.exit_code == EXIT_UNAVAILABLE


def test_tail_lists_carried_records_before_their_carrier(
    nats_url: str, namespace: str, env: dict[str, str]
) -> None:
    asyncio.run(_seed(nats_url, namespace, tamper=False))
    result = CliRunner().invoke(app, ["tail", "-n", "3"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert ["kb.search" in lines[0], "crm.lookup_customer" in lines[1]] == [True, True]
    assert len(lines) == 4
