"""Workload identity against a real OpenBao: certificates from the mesh CA, renewal with
no failed call, and what a workload without the right certificate can and cannot do."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.identity.names import WorkloadName
from tessera.identity.source import PKI_MOUNT, CertificateSource
from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import error_details
from tessera.runtime.grpc_client import channel
from tessera.runtime.grpc_server import GrpcServer
from tessera.v1 import agent_pb2, agent_pb2_grpc
from tessera.vault import bootstrap
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultPermissionDenied

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "tessera.local"
SHORT_TTL_S = 6


@pytest.fixture(scope="module")
def approles(openbao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    secrets_dir = tmp_path_factory.mktemp("identity") / "secrets"
    return bootstrap.apply(openbao.addr, openbao.root_token, REPO / "vault", secrets_dir)


@pytest.fixture
async def vaults(openbao, approles: dict[str, Path]) -> AsyncIterator[dict[str, VaultClient]]:  # type: ignore[no-untyped-def]
    clients: dict[str, VaultClient] = {}
    try:
        for name in ("coordinator", "agent-billing", "agent-triage", "planner"):
            clients[name] = await VaultClient.from_approle_file(openbao.addr, approles[name])
        yield clients
    finally:
        for client in clients.values():
            await client.close()


async def _source(vault: VaultClient, ttl_s: int = 300) -> CertificateSource:
    return await CertificateSource.start(vault, trust_domain=TRUST_DOMAIN, ttl_s=ttl_s)


def _server(name: str, identity: CertificateSource, *, agent: bool = False) -> GrpcServer:
    class Agent(agent_pb2_grpc.AgentServiceServicer):
        async def ExecuteTask(self, request, context):  # type: ignore[no-untyped-def]
            Agent.calls += 1
            return agent_pb2.ExecuteTaskResponse()

        calls = 0

    register = [lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(Agent(), s)]
    server = GrpcServer(
        name=name,
        settings=ServiceSettings(listen="127.0.0.1:0", insecure_plaintext=False),
        register=register if agent else [],
        service_names=["tessera.v1.AgentService"] if agent else [],
        identity=identity,
    )
    server.calls = Agent  # type: ignore[attr-defined]
    return server


async def test_a_role_issues_only_its_own_name(vaults: dict[str, VaultClient]) -> None:
    billing = WorkloadName.of("agent-billing")
    issued = await vaults["agent-billing"].issue_certificate(
        mount=PKI_MOUNT,
        role="agent-billing",
        common_name=billing.dns_name,
        uri_sans=[billing.spiffe_id],
        ttl_s=60,
    )
    assert "BEGIN CERTIFICATE" in issued.certificate and "private_key" not in repr(issued)
    coordinator = WorkloadName.of("coordinator")
    with pytest.raises(VaultPermissionDenied):  # another name from its own role
        await vaults["agent-billing"].issue_certificate(
            mount=PKI_MOUNT,
            role="agent-billing",
            common_name=coordinator.dns_name,
            uri_sans=[coordinator.spiffe_id],
            ttl_s=60,
        )
    with pytest.raises(VaultPermissionDenied):  # another identity's role
        await vaults["agent-triage"].issue_certificate(
            mount=PKI_MOUNT,
            role="agent-billing",
            common_name=billing.dns_name,
            uri_sans=[billing.spiffe_id],
            ttl_s=60,
        )


async def test_renewals_on_both_sides_fail_no_call(vaults: dict[str, VaultClient]) -> None:
    server_id = await _source(vaults["planner"], ttl_s=SHORT_TTL_S)
    client_id = await _source(vaults["coordinator"], ttl_s=SHORT_TTL_S)
    server = _server("planner", server_id)
    await server.start()
    renewed = asyncio.Event()
    first_expiry = min(server_id.current.expiration, client_id.current.expiration)
    last_ok = 0.0
    ch = channel(server.address, identity=client_id, peer=server_id.name, max_attempts=1)
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        calls = failures = 0
        server_start, client_start = server_id.generation, client_id.generation

        def check_renewed() -> None:
            if (
                server_id.generation >= server_start + 2
                and client_id.generation >= client_start + 2
            ):
                renewed.set()

        server_id.subscribe(check_renewed)
        client_id.subscribe(check_renewed)

        async def call_until_renewed() -> None:
            nonlocal calls, failures, last_ok
            while not (renewed.is_set() and time.time() > first_expiry + 1):
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    last_ok = time.time()
                except grpc.aio.AioRpcError:
                    failures += 1
                calls += 1
                await asyncio.sleep(0.05)  # pacing the calls, not waiting for an event

        await asyncio.wait_for(call_until_renewed(), timeout=SHORT_TTL_S * 4)
    finally:
        await ch.close()
        await server.stop(0)
        await server_id.close()
        await client_id.close()
    assert failures == 0 and calls > 10
    # Still served after the first certificates of both sides expired.
    assert last_ok > first_expiry


async def test_a_server_without_the_expected_name_gets_no_call(
    vaults: dict[str, VaultClient],
) -> None:
    """The coordinator expects agent/billing at an endpoint (a forged registry entry, say)
    and finds another identity there: the handshake fails, the request is never sent."""
    triage = await _source(vaults["agent-triage"])
    coordinator = await _source(vaults["coordinator"])
    server = _server("impostor", triage, agent=True)
    await server.start()
    try:
        billing = WorkloadName.of("agent-billing")
        async with channel(
            server.address, identity=coordinator, peer=billing, max_attempts=1
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await agent_pb2_grpc.AgentServiceStub(ch).ExecuteTask(
                    agent_pb2.ExecuteTaskRequest(task_token="hvs.secret"), timeout=3
                )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.calls.calls == 0  # type: ignore[attr-defined]
    finally:
        await server.stop(0)
        await triage.close()
        await coordinator.close()


async def test_only_the_coordinator_may_execute_a_task(vaults: dict[str, VaultClient]) -> None:
    billing = await _source(vaults["agent-billing"])
    triage = await _source(vaults["agent-triage"])
    coordinator = await _source(vaults["coordinator"])
    server = _server("billing", billing, agent=True)
    await server.start()
    try:
        async with channel(
            server.address, identity=triage, peer=billing.name, max_attempts=1
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await agent_pb2_grpc.AgentServiceStub(ch).ExecuteTask(
                    agent_pb2.ExecuteTaskRequest(), timeout=5
                )
        details = error_details(denied.value)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details.reason == "CALLER_NOT_ALLOWED"
        assert details.metadata["caller"] == "spiffe://tessera.local/agent/triage"
        assert server.calls.calls == 0  # type: ignore[attr-defined]
        async with grpc.aio.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent_pb2_grpc.AgentServiceStub(plain).ExecuteTask(
                    agent_pb2.ExecuteTaskRequest(), timeout=3
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with channel(
            server.address, identity=coordinator, peer=billing.name, max_attempts=1
        ) as ch:
            await agent_pb2_grpc.AgentServiceStub(ch).ExecuteTask(
                agent_pb2.ExecuteTaskRequest(), timeout=5
            )
        assert server.calls.calls == 1  # type: ignore[attr-defined]
    finally:
        await server.stop(0)
        for source in (billing, triage, coordinator):
            await source.close()


def test_a_server_without_identity_refuses_to_start_unless_asked_for_plaintext() -> None:
    server = GrpcServer(
        name="x",
        settings=ServiceSettings(listen="127.0.0.1:0", insecure_plaintext=False),
        register=[],
        service_names=[],
    )
    with pytest.raises(RuntimeError, match="no workload identity"):
        asyncio.run(server.start())


def _foreign_certificate(name: WorkloadName) -> tuple[bytes, bytes, bytes]:
    """A key, certificate and CA of another CA that claims ``name``'s identity."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.dns_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(name.dns_name),
                    x509.UniformResourceIdentifier(name.spiffe_id),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(pem), ca.public_bytes(pem)


async def test_a_certificate_of_another_ca_or_an_expired_one_is_refused(
    vaults: dict[str, VaultClient],
) -> None:
    """I2: the coordinator's name on a certificate from another CA, and the real
    coordinator's certificate after it expired: both fail the handshake; nothing runs."""
    billing = await _source(vaults["agent-billing"])
    server = _server("billing", billing, agent=True)
    await server.start()
    coordinator = WorkloadName.of("coordinator")
    try:
        key, cert, _their_ca = _foreign_certificate(coordinator)
        forged = grpc.ssl_channel_credentials(
            root_certificates=billing.ca_pem, private_key=key, certificate_chain=cert
        )
        expired = await vaults["coordinator"].issue_certificate(
            mount=PKI_MOUNT,
            role="coordinator",
            common_name=coordinator.dns_name,
            uri_sans=[coordinator.spiffe_id],
            ttl_s=2,
        )
        # The clock is the event here: wait until the short certificate has expired.
        await asyncio.sleep(max(0.0, expired.expiration - time.time()) + 1.0)
        stale = grpc.ssl_channel_credentials(
            root_certificates=billing.ca_pem,
            private_key=expired.private_key.encode(),
            certificate_chain=expired.certificate.encode(),
        )
        for credentials in (forged, stale):
            async with grpc.aio.secure_channel(
                server.address,
                credentials,
                options=[("grpc.ssl_target_name_override", billing.name.dns_name)],
            ) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await agent_pb2_grpc.AgentServiceStub(ch).ExecuteTask(
                        agent_pb2.ExecuteTaskRequest(), timeout=3
                    )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.calls.calls == 0  # type: ignore[attr-defined]
    finally:
        await server.stop(0)
        await billing.close()
