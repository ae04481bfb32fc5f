"""NATS on a `tessera up` mesh (RELIABILITY.md I1, I4): TLS required, every client
authenticated by its workload certificate, each identity writing only what it owns and
reading only what it needs (tessera/runtime/nats_permissions.py). Every forbidden write is
tried, and forbidden reads of each kind (another service's stream or bucket, the audit
trail, another identity's inbox); each is refused by the server, and the data is intact
afterwards."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import KeyNotFoundError, NotFoundError

from tessera.identity.nats_tls import inbox_prefix
from tessera.launcher import state as state_file
from tessera.launcher.operator import local_identity
from tessera.runtime.bus import Topology
from tests.integration.test_mesh_up import tessera

pytestmark = pytest.mark.integration

TOPOLOGY = Topology("tessera")
FORBIDDEN_WAIT_S = 2.0
"""How long a refused JetStream write waits for the ack that never comes."""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    data_dir = tmp_path_factory.mktemp("natsperm")
    started = tessera("up", data_dir=data_dir, timeout_s=240)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        recorded = state_file.read(data_dir)
        assert recorded is not None
        address = {c.name: c.address for c in recorded.components}
        yield data_dir, address["nats"], address["openbao"]
    finally:
        tessera("down", data_dir=data_dir)


class Violations:
    """What the server reported to a client (nats-py's error callback)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def callback(self) -> Callable[[Exception], Awaitable[None]]:
        async def record(exc: Exception) -> None:  # nats-py wants a coroutine function
            self.errors.append(str(exc))

        return record


async def _as(mesh: tuple[Path, str, str], identity: str) -> tuple[Client, Violations]:
    data_dir, url, vault = mesh
    cert = local_identity(data_dir, vault, identity)
    assert cert is not None
    seen = Violations()
    nc = await nats.connect(
        servers=[url],
        error_cb=seen.callback(),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        **cert.nats_options(),
    )
    return nc, seen


async def _refused(seen: Violations, action: str, subject: str) -> None:
    """Wait for the server's permission error naming ``subject`` (``action``: "publish"
    or "subscription"), as nats-py hands it to the error callback."""
    wanted = f'permissions violation for {action} to "{subject}"'.lower()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FORBIDDEN_WAIT_S
    while not any(wanted in e.lower() for e in seen.errors):
        assert loop.time() < deadline, (wanted, seen.errors)
        await asyncio.sleep(0.05)


async def _refused_write(nc: Client, subject: str, payload: bytes = b"x") -> None:
    """A JetStream publish the server must refuse: no ack ever comes."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await nc.jetstream().publish(subject, payload, timeout=FORBIDDEN_WAIT_S)


async def test_a_client_without_a_mesh_certificate_cannot_connect(
    mesh: tuple[Path, str, str],
) -> None:
    _, url, _ = mesh
    with pytest.raises((nats.errors.NoServersError, ssl.SSLError, OSError, nats.errors.Error)):
        await nats.connect(
            servers=[url], allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
        )
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE  # TLS, but no client certificate to present
    with pytest.raises((nats.errors.NoServersError, ssl.SSLError, OSError, nats.errors.Error)):
        await nats.connect(
            servers=[url],
            tls=insecure,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )


async def test_an_agent_certificate_is_no_nats_user(mesh: tuple[Path, str, str]) -> None:
    """Agents talk gRPC only (RegistryService, AgentService, the tool proxy): a valid
    agent certificate of the mesh CA maps to no NATS user and cannot connect."""
    with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
        nc, _ = await _as(mesh, "agent-billing")
        await nc.close()


async def test_only_the_registry_service_writes_the_registry(
    mesh: tuple[Path, str, str],
) -> None:
    nc, seen = await _as(mesh, "registry")
    planner, planner_seen = await _as(mesh, "planner")
    try:
        registry = await nc.jetstream().key_value(TOPOLOGY.registry_bucket)
        await registry.put("agent.billing.probe", b"mine")  # its bucket: allowed
        await registry.delete("agent.billing.probe")
        before = {k for k in await registry.keys() if k.startswith("agent.triage.")}
        assert before, "the real triage replica is registered"
        # Everything the registry service does not own: refused.
        for subject in (
            f"$KV.{TOPOLOGY.workflows_bucket}.wf.forged",
            f"$KV.{TOPOLOGY.idempotency_bucket}.forged",
            f"$KV.{TOPOLOGY.approvals_bucket}.forged",
            f"$KV.{TOPOLOGY.budgets_bucket}.wf.forged",
            TOPOLOGY.work_subject("advance"),
            TOPOLOGY.wf_events_subject("forged"),
            TOPOLOGY.audit_chain_subject("coordinator-forged", owner="coordinator"),
        ):
            await _refused_write(nc, subject)
        # Another service (the planner reads the registry) may not write it.
        for subject in (
            f"$KV.{TOPOLOGY.registry_bucket}.agent.triage.rogue",
            f"$KV.{TOPOLOGY.registry_bucket}.{sorted(before)[0]}",
        ):
            await _refused_write(planner, subject)
        after = {k for k in await registry.keys() if k.startswith("agent.triage.")}
        assert after == before and "agent.triage.rogue" not in after
        assert any("permissions violation" in e.lower() for e in seen.errors), seen.errors
        assert any("permissions violation" in e.lower() for e in planner_seen.errors), (
            planner_seen.errors
        )
    finally:
        await nc.close()
        await planner.close()


@pytest.mark.parametrize("identity", ["registry", "coordinator", "tool-proxy"])
async def test_nobody_but_the_operator_purges_or_deletes_the_audit_trail(
    mesh: tuple[Path, str, str], identity: str
) -> None:
    nc, _ = await _as(mesh, identity)
    operator, _ = await _as(mesh, "operator")
    try:
        before = (await operator.jetstream().stream_info(TOPOLOGY.audit_stream)).state
        for request in (
            f"$JS.API.STREAM.PURGE.{TOPOLOGY.audit_stream}",
            f"$JS.API.STREAM.DELETE.{TOPOLOGY.audit_stream}",
            f"$JS.API.STREAM.MSG.DELETE.{TOPOLOGY.audit_stream}",
        ):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(request, b'{"seq": 1}', timeout=FORBIDDEN_WAIT_S)
        after = (await operator.jetstream().stream_info(TOPOLOGY.audit_stream)).state
        assert after.messages >= before.messages and after.first_seq == before.first_seq
    finally:
        await nc.close()
        await operator.close()


async def _refused_read(
    nc: Client, seen: Violations, request: str, read: Callable[[], Awaitable[object]]
) -> None:
    """``read`` (a JetStream call that publishes ``request``) gets no answer: the server
    refused the request, and said so."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await read()
    await _refused(seen, "publish", request)


async def test_reads_are_scoped_to_the_streams_an_identity_needs(
    mesh: tuple[Path, str, str],
) -> None:
    """Each service reads its own state and nothing of another's: the tool proxy neither
    the coordinator's workflows nor the audit trail, the coordinator not the proxy's
    buckets, an audit writer only its own chains' heads, the planner not the audit stream,
    and nobody another identity's inbox. The operator reads everything."""
    t = TOPOLOGY
    proxy, proxy_seen = await _as(mesh, "tool-proxy")
    coordinator, coordinator_seen = await _as(mesh, "coordinator")
    planner, planner_seen = await _as(mesh, "planner")
    operator, _ = await _as(mesh, "operator")
    try:
        pjs = proxy.jetstream(timeout=FORBIDDEN_WAIT_S)
        cjs = coordinator.jetstream(timeout=FORBIDDEN_WAIT_S)
        ljs = planner.jetstream(timeout=FORBIDDEN_WAIT_S)
        audit = await operator.jetstream().stream_info(t.audit_stream)
        first_seq = max(1, audit.state.first_seq)

        # What each one needs: answered.
        approvals = await pjs.key_value(t.approvals_bucket)
        await approvals.put("permission-probe", b"mine")
        assert (await approvals.get("permission-probe")).value == b"mine"
        await approvals.delete("permission-probe")
        effects = await pjs.subscribe(
            t.events_subject("tool.effects"), stream=t.events_stream, ordered_consumer=True
        )
        await effects.unsubscribe()
        # Its outbox lookup: a named, filtered pull consumer, fetched from, then deleted.
        lookup = await pjs.add_consumer(
            t.events_stream,
            config=api.ConsumerConfig(
                name="permission-probe",
                filter_subject=t.events_subject("tool.effects"),
                ack_policy=api.AckPolicy.NONE,
                headers_only=True,
                inactive_threshold=30.0,
            ),
        )
        pull = await pjs.pull_subscribe_bind(stream=t.events_stream, name=lookup.name)
        if lookup.num_pending:
            assert await pull.fetch(1, timeout=FORBIDDEN_WAIT_S)
        await pull.unsubscribe()
        assert await pjs.delete_consumer(t.events_stream, lookup.name)
        workflows = await cjs.key_value(t.workflows_bucket)
        with pytest.raises(KeyNotFoundError):
            await workflows.get("wf.permission-probe-absent")
        registry = await ljs.key_value(t.registry_bucket)
        assert [k for k in await registry.keys() if k.startswith("agent.triage.")]
        # An audit writer finds its own chain's head (a 404 is an answer) ...
        with pytest.raises(NotFoundError):
            await cjs.get_last_msg(
                t.audit_stream, t.audit_chain_subject("absent", owner="coordinator"), direct=True
            )
        # ... and asking for a sequence number on that subject does not widen it.
        own = f"$JS.API.DIRECT.GET.{t.audit_stream}." + t.audit_chain_subject(
            "absent", owner="coordinator"
        )
        answer = await coordinator.request(own, b'{"seq": 1}', timeout=FORBIDDEN_WAIT_S)
        assert not answer.data, "a direct get by subject never returns another record"

        # The tool proxy: not the coordinator's workflow KV, not the audit stream.
        kv_workflows = f"KV_{t.workflows_bucket}"
        await _refused_read(
            proxy,
            proxy_seen,
            f"$JS.API.STREAM.INFO.{kv_workflows}",
            lambda: pjs.key_value(t.workflows_bucket),
        )
        direct = f"$JS.API.DIRECT.GET.{kv_workflows}.$KV.{t.workflows_bucket}.wf.x"
        await _refused_read(
            proxy, proxy_seen, direct, lambda: proxy.request(direct, b"", timeout=1.0)
        )
        await _refused_read(
            proxy,
            proxy_seen,
            f"$JS.API.CONSUMER.CREATE.{t.audit_stream}",
            lambda: pjs.subscribe(t.audit_subjects, stream=t.audit_stream, ordered_consumer=True),
        )
        await _refused_read(
            proxy,
            proxy_seen,
            f"$JS.API.STREAM.MSG.GET.{t.audit_stream}",
            lambda: pjs.get_msg(t.audit_stream, first_seq),
        )
        # Nor could it make the audit stream copy itself somewhere it may read.
        update = f"$JS.API.STREAM.UPDATE.{t.audit_stream}"
        await _refused_read(
            proxy, proxy_seen, update, lambda: proxy.request(update, b"{}", timeout=1.0)
        )

        # The coordinator: not the tool proxy's buckets, not another writer's chain.
        await _refused_read(
            coordinator,
            coordinator_seen,
            f"$JS.API.STREAM.INFO.KV_{t.approvals_bucket}",
            lambda: cjs.key_value(t.approvals_bucket),
        )
        others = t.audit_chain_subject("tool-proxy-x", owner="tool-proxy")
        await _refused_read(
            coordinator,
            coordinator_seen,
            f"$JS.API.DIRECT.GET.{t.audit_stream}.{others}",
            lambda: cjs.get_last_msg(t.audit_stream, others, direct=True),
        )

        # The planner (no audit writer): not a record of the audit stream.
        await _refused_read(
            planner,
            planner_seen,
            f"$JS.API.CONSUMER.CREATE.{t.audit_stream}",
            lambda: ljs.subscribe(t.audit_subjects, stream=t.audit_stream, ordered_consumer=True),
        )
        await _refused_read(
            planner,
            planner_seen,
            f"$JS.API.STREAM.INFO.{t.audit_stream}",
            lambda: ljs.stream_info(t.audit_stream),
        )

        # Nobody overhears another identity's replies or deliveries.
        for subject in (f"{inbox_prefix('coordinator')}.>", "_INBOX.>", ">"):
            sub = await proxy.subscribe(subject)
            await proxy.flush()
            await _refused(proxy_seen, "subscription", subject)
            await sub.unsubscribe()

        # The operator reads the whole trail; the records are all there.
        trail = await operator.jetstream().subscribe(
            t.audit_subjects, stream=t.audit_stream, ordered_consumer=True
        )
        await trail.unsubscribe()
        if audit.state.messages:
            assert (await operator.jetstream().get_msg(t.audit_stream, first_seq)).data
        after = (await operator.jetstream().stream_info(t.audit_stream)).state
        assert after.first_seq == audit.state.first_seq and after.messages >= audit.state.messages
    finally:
        for nc in (proxy, coordinator, planner, operator):
            await nc.close()


async def test_the_coordinator_writes_workflow_state_but_not_the_proxys_buckets(
    mesh: tuple[Path, str, str],
) -> None:
    nc, _ = await _as(mesh, "coordinator")
    try:
        workflows = await nc.jetstream().key_value(TOPOLOGY.workflows_bucket)
        revision = await workflows.put("wf.permission-probe", b"{}")
        assert revision > 0
        await workflows.delete("wf.permission-probe")
        await _refused_write(nc, f"$KV.{TOPOLOGY.idempotency_bucket}.forged")
        await _refused_write(nc, TOPOLOGY.audit_chain_subject("tool-proxy-x", owner="tool-proxy"))
        budgets = await nc.jetstream().key_value(TOPOLOGY.budgets_bucket)  # its ledger
        await budgets.put("wf.permission-probe", b"")
        await budgets.delete("wf.permission-probe")
    finally:
        await nc.close()


async def test_the_tool_proxy_reads_the_budget_ledger_but_cannot_write_it(
    mesh: tuple[Path, str, str],
) -> None:
    """The coordinator owns the workflow budgets; the proxy only reads the live value."""
    nc, _ = await _as(mesh, "tool-proxy")
    try:
        budgets = await nc.jetstream().key_value(TOPOLOGY.budgets_bucket)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await budgets.get("wf.no-such-workflow")
        await _refused_write(nc, f"$KV.{TOPOLOGY.budgets_bucket}.wf.forged")
    finally:
        await nc.close()


async def test_services_keep_working_under_the_permissions(
    mesh: tuple[Path, str, str],
) -> None:
    """The whole mesh ran a workflow on these permissions: none of its processes logged
    a permission violation."""
    data_dir, _, _ = mesh
    env = {**os.environ, "TESSERA_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tessera.cli.main", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for log in (data_dir / "logs").glob("*.log"):
        if log.name.startswith("nats"):
            continue
        # nats-py reports the server's -ERR as "nats: permissions violation for ...".
        text = log.read_text(errors="replace").lower()
        assert "permissions violation" not in text, log.name


def _served_certificate(nc: Client) -> bytes:
    # nats-py keeps the TLS stream in its transport; no public accessor for the peer cert.
    writer = nc._transport._io_writer  # type: ignore[union-attr]
    der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return der


async def test_the_server_certificate_rotates_with_no_dropped_connection(
    mesh: tuple[Path, str, str],
) -> None:
    """`tessera creds rotate nats`: a fresh server certificate, reloaded in place; a
    connection made before keeps working and a new one is served the new certificate."""
    data_dir = mesh[0]
    before, _ = await _as(mesh, "coordinator")
    try:
        old = _served_certificate(before)
        rotated = await asyncio.to_thread(
            tessera, "creds", "rotate", "nats", data_dir=data_dir, timeout_s=60
        )
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "reloaded by nats" in rotated.stdout, rotated.stdout
        after, _ = await _as(mesh, "coordinator")
        try:
            assert _served_certificate(after) != old
            for nc in (before, after):  # both still authenticated as the coordinator
                workflows = await nc.jetstream().key_value(TOPOLOGY.workflows_bucket)
                await workflows.put("wf.rotation-probe", b"{}")
            await workflows.delete("wf.rotation-probe")
        finally:
            await after.close()
    finally:
        await before.close()
