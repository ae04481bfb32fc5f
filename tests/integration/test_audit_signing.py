"""An audit trail that proves itself, against the real NATS JetStream and OpenBao.

Stories: a writer signs its chain head with its own Transit key and the chain verifies,
live and from an export with no Vault; a forger who edits a record and re-hashes the
chain is caught because the signature does not follow; a receipt is checked against its
chain; keys rotate and old checkpoints still verify; a writer cannot sign with another
writer's key; the audit stream refuses delete and purge; the HMAC key is one for every
replica; the coordinator never drops a record when its backlog is full.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest
import typer
from google.protobuf import struct_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import APIError
from typer.testing import CliRunner, Result

from services.coordinator.audit import WorkflowAuditor
from tessera.audit import (
    AuditWriter,
    PublicKeys,
    check_receipt,
    load_export,
    read_all,
    record_hash,
    verify,
    verify_entries,
)
from tessera.cli import audit as audit_cli
from tessera.cli import creds as creds_cli
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import audit_pb2, common_pb2, tool_proxy_pb2, tool_proxy_pb2_grpc
from tessera.vault import VaultClient
from tessera.vault.audit_keys import (
    TransitSigner,
    read_hmac_key,
    read_public_keys,
    rotate_signing_keys,
)
from tessera.vault.bootstrap import apply
from tessera.vault.errors import VaultPermissionDenied
from tests.conftest import OpenBao
from tests.integration.harness import Mesh

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DECISION = audit_pb2.AUDIT_KIND_POLICY_DECISION


@dataclass
class Env:
    bao: OpenBao
    creds: dict[str, Path]


@pytest.fixture(scope="module")
def env(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """vault/ as shipped, applied (Transit keys and the HMAC key included)."""
    secrets_dir = tmp_path_factory.mktemp("audit-signing") / "approle"
    return Env(openbao, apply(openbao.addr, openbao.root_token, REPO / "vault", secrets_dir))


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="test-audit-signing")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def bus(nc: Client, namespace: str) -> tuple[JetStreamContext, Topology]:
    js = nc.jetstream()
    topology = Topology(namespace)
    await declare(js, topology)
    return js, topology


@pytest.fixture
async def policy_vault(env: Env) -> AsyncIterator[VaultClient]:
    async with await VaultClient.from_approle_file(env.bao.addr, env.creds["policy"]) as vault:
        yield vault


async def signed_writer(
    bus: tuple[JetStreamContext, Topology],
    vault: VaultClient,
    *,
    name: str,
    every: int = 1000,
    interval_s: float = 3600.0,
    min_interval_s: float = 0.0,
) -> AuditWriter:
    js, topology = bus
    writer = AuditWriter(
        js,
        topology,
        writer=name,
        actor="policy",
        signer=TransitSigner.for_client(vault),
        checkpoint_every=every,
        checkpoint_interval_s=interval_s,
        checkpoint_min_interval_s=min_interval_s,
    )
    await writer.start()
    return writer


async def write(writer: AuditWriter, count: int) -> list[audit_pb2.AuditRecord]:
    return [
        await writer.append(DECISION, outcome="allow", resource=f"tool.{i}", decision_id=f"d{i}")
        for i in range(count)
    ]


async def public_keys(env: Env) -> PublicKeys:
    return await read_public_keys(env.bao.addr, env.bao.root_token)


async def eventually(check: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def invoke(app: typer.Typer, args: list[str], *, env: dict[str, str]) -> Result:
    """Run a `tessera` command as a user would (in a thread: it runs its own event loop)."""
    return await asyncio.to_thread(lambda: CliRunner().invoke(app, args, env=env))


def cli_env(env: Env, nats_url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    return {
        "TESSERA_NATS_URL": nats_url,
        "TESSERA_NAMESPACE": namespace,
        "VAULT_TOKEN": env.bao.root_token,
        "TESSERA_DATA_DIR": str(tmp_path / "no-mesh"),
        "COLUMNS": "200",
    }


# -- signing -------------------------------------------------------------------------------


async def test_checkpoints_every_n_records_and_at_close_verify(
    env: Env, bus: tuple[JetStreamContext, Topology], policy_vault: VaultClient
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-n", every=3)
    await write(writer, 7)
    await writer.close()  # what is not signed yet is signed at shutdown

    report = await verify(*bus, keys=await public_keys(env))

    chain = report.chain("policy-n")
    assert report.ok, [str(i) for i in report.issues]
    assert chain is not None and chain.signatures_checked
    assert chain.checkpoints >= 2  # after 3 and 6 records (the last may be the close's)
    assert chain.uncovered == 0 and chain.covered_sequence == chain.head_sequence - 1
    kinds = [e.record.kind for e in (await read_all(*bus))[0] if e.record is not None]
    assert kinds.count(audit_pb2.AUDIT_KIND_CHECKPOINT) == chain.checkpoints
    assert kinds[-1] == audit_pb2.AUDIT_KIND_CHECKPOINT


async def test_a_busy_chain_is_signed_at_most_once_per_min_interval(
    env: Env, bus: tuple[JetStreamContext, Topology], policy_vault: VaultClient
) -> None:
    """Vault's signing load does not grow with traffic: 30 records at ``every=3`` cost one
    signature within the minimum interval, and the count trigger is honoured after it."""
    writer = await signed_writer(
        bus, policy_vault, name="policy-m", every=3, interval_s=60.0, min_interval_s=3.0
    )
    try:
        await write(writer, 3)
        await eventually(lambda: writer.last_checkpoint == 4)  # the first: at once
        await write(writer, 30)
        assert writer.last_checkpoint == 4  # 10 more triggers, no new signature yet
        await eventually(lambda: writer.last_checkpoint > 4, timeout_s=10.0)
        report = await verify(*bus, keys=await public_keys(env))
        chain = report.chain("policy-m")
        assert report.ok and chain is not None
        assert chain.checkpoints == 2 and chain.covered_sequence >= 34
    finally:
        await writer.close()


async def test_checkpoints_every_t_seconds_while_the_chain_grows(
    env: Env, bus: tuple[JetStreamContext, Topology], policy_vault: VaultClient
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-t", interval_s=0.2)
    try:
        await write(writer, 2)
        await eventually(lambda: writer.last_checkpoint == 3)
        idle_head = writer.head_sequence
        await asyncio.sleep(0.5)  # idle: nothing new to sign, no checkpoint written
        assert writer.head_sequence == idle_head
    finally:
        await writer.close()


async def test_records_after_the_last_checkpoint_are_not_yet_covered(
    env: Env, bus: tuple[JetStreamContext, Topology], policy_vault: VaultClient
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-u")
    await write(writer, 3)
    assert await writer.checkpoint() is not None
    await write(writer, 2)

    report = await verify(*bus, keys=await public_keys(env))

    chain = report.chain("policy-u")
    assert report.ok and chain is not None
    assert (chain.covered_sequence, chain.uncovered) == (3, 2)


async def test_deferred_records_are_signed_too_and_a_checkpoint_carries_none(
    env: Env, bus: tuple[JetStreamContext, Topology], policy_vault: VaultClient
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-c")
    writer.defer(DECISION, outcome="executed", decision_id="x1")
    await write(writer, 1)  # carries x1
    writer.defer(DECISION, outcome="executed", decision_id="x2")
    checkpoint = await writer.checkpoint()  # signs record 1; x2 stays deferred
    await writer.close()  # x2 written, then signed

    report = await verify(*bus, keys=await public_keys(env))

    chain = report.chain("policy-c")
    assert checkpoint is not None and not checkpoint.carried
    assert report.ok and chain is not None
    assert (chain.records, chain.carried, chain.uncovered) == (4, 1, 0)


async def test_a_rehashed_chain_without_a_valid_signature_is_forged(
    env: Env,
    bus: tuple[JetStreamContext, Topology],
    policy_vault: VaultClient,
    nc: Client,
    namespace: str,
    nats_url: str,
    tmp_path: Path,
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-f", every=2)
    await write(writer, 4)
    await writer.close()
    stored, _ = await read_all(*bus)
    records = [e.record for e in stored if e.record is not None]
    # The forger, with write access to a stream, copies the chain with record 2 saying
    # "deny", and re-links and re-hashes everything after it: every hash matches.
    records[1].outcome = "deny"
    for i in range(1, len(records)):
        records[i].prev_hash = records[i - 1].hash
        records[i].hash = record_hash(records[i])
    forged_topology = Topology(namespace + "x")
    js = nc.jetstream()
    await declare(js, forged_topology)
    for record in records:
        await js.publish(
            forged_topology.audit_chain_subject("policy-f"), record.SerializeToString()
        )

    hashes_only = await verify(js, forged_topology)
    report = await verify(js, forged_topology, keys=await public_keys(env))

    assert not [i for i in hashes_only.issues if i.kind != "forged"]  # hashes and links hold
    forged = [i for i in report.issues if i.kind == "forged"]
    assert forged and all(i.writer == "policy-f" for i in forged)
    assert report.chain("policy-f").covered_sequence == 0  # type: ignore[union-attr]
    # The CLI says so too (exit 1, "forged").
    result = await invoke(
        audit_cli.app,
        ["verify", "--addr", env.bao.addr],
        env={**cli_env(env, nats_url, namespace, tmp_path), "TESSERA_NAMESPACE": namespace + "x"},
    )
    assert result.exit_code == audit_cli.EXIT_TAMPERED, result.output
    assert "forged" in result.output


async def test_re_signing_a_forged_chain_with_another_writers_key_is_forged(
    env: Env, bus: tuple[JetStreamContext, Topology], nc: Client, namespace: str
) -> None:
    # The forger holds the tool proxy's credentials: its key signs fine, but it does not
    # own the policy service's chain.
    async with await VaultClient.from_approle_file(
        env.bao.addr, env.creds["tool-proxy"]
    ) as proxy_vault:
        js, topology = bus
        writer = AuditWriter(
            js,
            topology,
            writer="policy-g",
            actor="policy",
            signer=TransitSigner.for_client(proxy_vault),
        )
        await writer.start()
        await write(writer, 2)
        await writer.close()

    report = await verify(*bus, keys=await public_keys(env))

    assert [(i.kind, i.sequence) for i in report.issues] == [("forged", 3)]
    assert "does not own" in report.issues[0].detail


# -- export, offline -----------------------------------------------------------------------


async def test_an_export_verifies_offline_with_no_nats_and_no_vault(
    env: Env,
    bus: tuple[JetStreamContext, Topology],
    policy_vault: VaultClient,
    nats_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-e", every=2)
    await write(writer, 3)
    await writer.close()
    path = tmp_path / "audit.jsonl"

    exported = await invoke(
        audit_cli.app,
        ["export", str(path), "--addr", env.bao.addr],
        env=cli_env(env, nats_url, namespace, tmp_path),
    )
    offline_env = {
        "TESSERA_NATS_URL": "nats://127.0.0.1:1",
        "TESSERA_NAMESPACE": namespace,
        "TESSERA_DATA_DIR": str(tmp_path / "no-mesh"),
        "VAULT_ADDR": "http://127.0.0.1:1",
        "COLUMNS": "200",
    }
    offline = await invoke(audit_cli.app, ["verify", "--from", str(path)], env=offline_env)

    assert exported.exit_code == 0, exported.output
    loaded = load_export(path)
    assert "audit-policy" in loaded.keys.keys
    assert offline.exit_code == 0, offline.output
    assert "signatures checked" in offline.output
    # A copy of the export with record 2 edited and re-hashed: forged, offline too.
    lines = path.read_text().splitlines()
    header, body = lines[0], [json.loads(line) for line in lines[1:]]
    records = [audit_pb2.AuditRecord.FromString(base64.b64decode(e["data"])) for e in body]
    records[1].outcome = "deny"
    for i in range(1, len(records)):
        records[i].prev_hash = records[i - 1].hash
        records[i].hash = record_hash(records[i])
    for entry, record in zip(body, records, strict=True):
        entry["data"] = base64.b64encode(record.SerializeToString()).decode()
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join([header, *(json.dumps(e) for e in body)]) + "\n")
    caught = await invoke(audit_cli.app, ["verify", "--from", str(tampered)], env=offline_env)
    assert caught.exit_code == audit_cli.EXIT_TAMPERED, caught.output
    assert "forged" in caught.output


# -- receipts ------------------------------------------------------------------------------


async def test_a_receipt_verifies_once_a_later_checkpoint_covers_it(
    env: Env,
    bus: tuple[JetStreamContext, Topology],
    policy_vault: VaultClient,
    nats_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-r")
    record = (await write(writer, 1))[0]
    receipt = writer.receipt(record)
    compact = f"{receipt.writer}:{receipt.sequence}:{receipt.record_hash.hex()}"
    env_vars = cli_env(env, nats_url, namespace, tmp_path)
    args = ["verify", "--addr", env.bao.addr, "--receipt"]

    before = await invoke(audit_cli.app, [*args, compact], env=env_vars)
    await writer.checkpoint()
    await write(writer, 1)
    after = await invoke(audit_cli.app, [*args, compact], env=env_vars)
    wrong = await invoke(
        audit_cli.app, [*args, f"{receipt.writer}:{receipt.sequence}:{'00' * 32}"], env=env_vars
    )
    await writer.close()

    assert before.exit_code == audit_cli.EXIT_NOT_COVERED, before.output
    assert after.exit_code == 0, after.output
    assert "RECEIPT OK" in after.output
    assert wrong.exit_code == audit_cli.EXIT_TAMPERED, wrong.output
    stored, last = await read_all(*bus)
    report = verify_entries(stored, last_stream_sequence=last, keys=await public_keys(env))
    assert check_receipt(report, stored, receipt).status == "covered"


# -- rotation ------------------------------------------------------------------------------


async def test_after_a_key_rotation_old_and_new_checkpoints_verify(
    env: Env,
    bus: tuple[JetStreamContext, Topology],
    policy_vault: VaultClient,
    nats_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    writer = await signed_writer(bus, policy_vault, name="policy-k")
    await write(writer, 2)
    old = await writer.checkpoint()
    # `tessera creds rotate signing policy`, while the writer keeps writing.
    rotated = await invoke(
        creds_cli.app,
        ["rotate", "signing", "policy", "--addr", env.bao.addr, "--no-audit"],
        env=cli_env(env, nats_url, namespace, tmp_path),
    )
    await write(writer, 2)
    new = await writer.checkpoint()
    await writer.close()

    assert rotated.exit_code == 0, rotated.output
    assert old is not None and new is not None
    assert new.checkpoint.key_version == old.checkpoint.key_version + 1
    report = await verify(*bus, keys=await public_keys(env))
    chain = report.chain("policy-k")
    assert report.ok, [str(i) for i in report.issues]
    assert chain is not None and chain.checkpoints == 2 and chain.uncovered == 0


def test_rotation_adds_a_version_to_every_writer_key(env: Env) -> None:
    client = hvac.Client(url=env.bao.addr, token=env.bao.root_token, timeout=5)
    try:
        before = asyncio.run(public_keys(env))
        rotated = rotate_signing_keys(client)
    finally:
        client.adapter.close()
    for name, version in rotated.items():
        assert version == max(before.keys[name]) + 1


# -- who may sign, who may read ------------------------------------------------------------


async def test_a_writer_cannot_sign_with_another_writers_key(policy_vault: VaultClient) -> None:
    own = TransitSigner.for_client(policy_vault)
    others = TransitSigner.for_client(policy_vault, identity="coordinator")

    signed = await own.sign(b"tessera-audit-checkpoint/v1\npolicy-x\n1\n00")
    with pytest.raises(VaultPermissionDenied):
        await others.sign(b"tessera-audit-checkpoint/v1\ncoordinator-x\n1\n00")

    assert signed.key_name == "audit-policy" and signed.signature


async def test_the_hmac_key_is_one_for_every_replica_and_only_the_proxy_reads_it(
    env: Env, policy_vault: VaultClient
) -> None:
    async with await VaultClient.from_approle_file(env.bao.addr, env.creds["tool-proxy"]) as first:
        key = await read_hmac_key(first)
    async with await VaultClient.from_approle_file(
        env.bao.addr, env.creds["tool-proxy"]
    ) as restarted:
        again = await read_hmac_key(restarted)

    assert key == again and len(key) == 32
    with pytest.raises(VaultPermissionDenied):
        await read_hmac_key(policy_vault)
    apply(env.bao.addr, env.bao.root_token, REPO / "vault", next(iter(env.creds.values())).parent)
    async with await VaultClient.from_approle_file(
        env.bao.addr, env.creds["tool-proxy"]
    ) as after_bootstrap:
        assert await read_hmac_key(after_bootstrap) == key  # never overwritten


# -- the stream ------------------------------------------------------------------------------


async def test_the_audit_stream_refuses_delete_and_purge(
    env: Env, bus: tuple[JetStreamContext, Topology], policy_vault: VaultClient
) -> None:
    js, topology = bus
    writer = await signed_writer(bus, policy_vault, name="policy-d")
    await write(writer, 3)
    await writer.close()

    with pytest.raises(APIError) as deleting:
        await js.delete_msg(topology.audit_stream, 2)
    with pytest.raises(APIError) as purging:
        await js.purge_stream(topology.audit_stream)

    assert "not permitted" in str(deleting.value.description)
    assert "not permitted" in str(purging.value.description)
    info = await js.stream_info(topology.audit_stream)
    assert info.state.messages == 4
    assert (await verify(js, topology, keys=await public_keys(env))).ok


async def test_an_audit_stream_declared_before_is_updated_to_deny(
    nc: Client, namespace: str
) -> None:
    js = nc.jetstream()
    topology = Topology(namespace)
    await js.add_stream(
        api.StreamConfig(name=topology.audit_stream, subjects=[topology.audit_subjects])
    )

    await declare(js, topology)

    config = (await js.stream_info(topology.audit_stream)).config
    assert config.deny_delete and config.deny_purge
    with pytest.raises(APIError):
        await js.purge_stream(topology.audit_stream)


# -- the coordinator's backlog ---------------------------------------------------------------


async def test_the_coordinator_waits_instead_of_dropping_records_when_its_backlog_is_full(
    nc: Client, namespace: str
) -> None:
    js = nc.jetstream(timeout=0.5)
    topology = Topology(namespace)
    writer = AuditWriter(js, topology, writer="coordinator-bp", actor="coordinator")
    auditor = WorkflowAuditor(writer, queue_limit=2)
    await auditor.start()  # no stream yet: every append fails and is retried
    kind = audit_pb2.AUDIT_KIND_WORKFLOW_TRANSITION
    for i in range(2):  # the backlog is full: records not yet stored, being retried
        await auditor.record(kind, workflow_id=f"wf-{i}", outcome="started")
    assert auditor.backlog == 2
    blocked = asyncio.create_task(auditor.record(kind, workflow_id="wf-2", outcome="started"))
    await asyncio.sleep(0.3)
    assert not blocked.done()  # back-pressure: the caller waits, nothing is dropped

    await declare(js, topology)  # the audit stream comes back
    await asyncio.wait_for(blocked, 10)
    await auditor.stop()

    stored, _ = await read_all(js, topology)
    workflows = [  # written together (group commit): the older ones carried by the newest
        r.workflow_id for e in stored if e.record is not None for r in (*e.record.carried, e.record)
    ]
    assert workflows == ["wf-0", "wf-1", "wf-2"]


# -- end to end: a governed call through the mTLS mesh ---------------------------------------


async def test_a_governed_call_returns_a_receipt_that_verifies_after_shutdown(
    openbao: OpenBao, nats_url: str, namespace: str, nc: Client, tmp_path: Path
) -> None:
    async with Mesh(nats_url, namespace, coordinators=0, vault=openbao) as mesh:
        async with await VaultClient.from_approle_file(
            openbao.addr, mesh.approles["coordinator"]
        ) as coordinator:
            token = await coordinator.create_task_token(
                tools=["crm.lookup_customer"],
                ttl_s=60,
                num_uses=2,
                meta={"workflow": "wf-r1", "task": "t-1", "agent": "billing"},
            )
        arguments = struct_pb2.Struct()
        arguments.update({"customer_id": "c-42"})
        call = tool_proxy_pb2.InvokeToolRequest(
            context=common_pb2.RequestContext(workflow_id="wf-r1", task_id="t-1"),
            tool="crm.lookup_customer",
            arguments=arguments,
        )
        async with await mesh.channel_as(
            "agent-billing", mesh.tool_proxy_address, peer="tool-proxy"
        ) as channel:
            response = await tool_proxy_pb2_grpc.ToolProxyServiceStub(channel).InvokeTool(
                call, metadata=((TASK_TOKEN_METADATA, token.token),), timeout=10
            )
    # Every writer signed its head when it stopped.

    receipt = response.receipt
    keys = await read_public_keys(openbao.addr, openbao.root_token)
    stored, last = await read_all(nc.jetstream(), Topology(namespace))
    report = verify_entries(stored, last_stream_sequence=last, keys=keys)

    assert receipt.writer.startswith("tool-proxy-") and receipt.decision_id
    assert receipt.decision_id == response.decision_id
    assert report.ok, [str(i) for i in report.issues]
    writers = {c.writer.split("-")[0] for c in report.chains}
    # The decision was made in the proxy (the default, distributed policy mode): it rides
    # on the proxy's own record, and the policy service wrote none.
    assert "tool" in writers
    assert all(c.checkpoints >= 1 and c.uncovered == 0 for c in report.chains)
    assert check_receipt(report, stored, receipt).status == "covered"
