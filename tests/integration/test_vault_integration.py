"""Vault-as-code, the bootstrap and the services' AppRole client, against a real OpenBao.

Stories: the security team applies ``vault/`` (twice, harmlessly); each service logs in as
itself and nothing more; the coordinator scopes a task to one tool and Vault enforces the
scope, the use limit and revocation; the tool proxy can inspect a task token but can read a
secret only with it; nobody's secrets end up in the logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
import requests

from tessera.launcher.ports import free_port
from tessera.vault import (
    InvalidToken,
    VaultClient,
    VaultPermissionDenied,
    VaultUnavailable,
    tool_slug,
)
from tessera.vault.bootstrap import apply, render_policies
from tessera.vault.naming import LOCAL_PROXY_SOURCE
from tests.conftest import OpenBao, private_openbao

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VAULT_DIR = REPO / "vault"
BAO = REPO / ".venv" / "bin" / "bao"
SERVICES = (
    "coordinator",
    "planner",
    "tool-proxy",
    "policy",
    "gateway-control-plane",
    "gateway",
    "operator",
    "registry",
    "console",
    "audit-reader",
    "nats",
)
AGENTS = (
    "triage",
    "billing",
    "technical",
    "account",
    "synthesis",
    "document-analysis",
    "risk",
    "compliance",
    "sourcing",
    "negotiation",
    "credit",
    "fraud",
    "churn",
    "aggregator",
    "a2a-bridge",
)


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """This module's own OpenBao: its tests create roles with second-long TTLs."""
    with private_openbao(tmp_path_factory.mktemp("bao")) as server:
        yield server


@dataclass(frozen=True)
class _Mesh:
    addr: str
    root: hvac.Client
    creds: dict[str, Path]
    secrets_dir: Path


@pytest.fixture(scope="module")
def mesh(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Mesh]:
    secrets_dir = tmp_path_factory.mktemp("creds") / "approle"
    creds = apply(openbao.addr, openbao.root_token, VAULT_DIR, secrets_dir)
    root = hvac.Client(url=openbao.addr, token=openbao.root_token)
    yield _Mesh(addr=openbao.addr, root=root, creds=creds, secrets_dir=secrets_dir)
    root.adapter.close()


async def _eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.1)


def _root_read(mesh: _Mesh, tool: str) -> dict[str, object]:
    resp = mesh.root.secrets.kv.v2.read_secret_version(
        path=tool_slug(tool), mount_point="tool-secrets", raise_on_deleted_version=True
    )
    return dict(resp["data"])


def _vault_state(mesh: _Mesh) -> dict[str, object]:
    """Everything the bootstrap manages, as the root token sees it."""
    policies = {
        name: mesh.root.sys.read_policy(name)["data"]["rules"]
        for name in render_policies(VAULT_DIR)
    }
    roles = {name: mesh.root.read(f"auth/approle/role/{name}")["data"] for name in mesh.creds}
    role_ids = {name: mesh.root.auth.approle.read_role_id(name)["data"] for name in mesh.creds}
    versions = {
        tool: _root_read(mesh, tool)["metadata"]["version"]  # type: ignore[index]
        for tool in ("kb.search", "email.send")
    }
    return {
        "policies": policies,
        "roles": roles,
        "role_ids": role_ids,
        "token_role": mesh.root.read("auth/token/roles/tessera-task")["data"],
        "mounts": sorted(mesh.root.sys.list_mounted_secrets_engines()["data"]),
        "auth": sorted(mesh.root.sys.list_auth_methods()["data"]),
        "tool_secret_versions": versions,
    }


# -- bootstrap ---------------------------------------------------------------------------


def test_bootstrap_twice_changes_nothing(mesh: _Mesh, openbao: OpenBao) -> None:
    before = _vault_state(mesh)

    again = apply(openbao.addr, openbao.root_token, VAULT_DIR, mesh.secrets_dir)

    assert again == mesh.creds
    assert _vault_state(mesh) == before
    assert set(mesh.creds) == {*SERVICES, *(f"agent-{a}" for a in AGENTS)}


def test_approle_files_are_readable_only_by_their_owner(mesh: _Mesh) -> None:
    assert stat.S_IMODE(mesh.secrets_dir.stat().st_mode) == 0o700
    for path in mesh.creds.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert set(json.loads(path.read_text())) == {"role_id", "secret_id"}


def test_bootstrap_refuses_a_world_readable_secrets_dir(openbao: OpenBao, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(Exception, match="readable only by its owner"):
        apply(openbao.addr, openbao.root_token, VAULT_DIR, shared)
    assert list(shared.iterdir()) == []


# -- identities ----------------------------------------------------------------------------


async def test_each_identity_logs_in_with_exactly_its_own_policy(mesh: _Mesh) -> None:
    for identity, path in mesh.creds.items():
        async with await VaultClient.from_approle_file(mesh.addr, path) as vault:
            info = await vault.lookup_self()
            assert info.policies == (identity,), identity
            assert vault.policies == (identity,)


async def test_agent_identity_cannot_create_or_inspect_tokens(mesh: _Mesh) -> None:
    async with (
        await VaultClient.from_approle_file(mesh.addr, mesh.creds["agent-billing"]) as agent,
        await VaultClient.from_approle_file(mesh.addr, mesh.creds["coordinator"]) as coordinator,
    ):
        with pytest.raises(VaultPermissionDenied):
            await agent.create_task_token(
                tools=["billing.issue_refund"], ttl_s=60, num_uses=1, meta={}
            )
        task = await coordinator.create_task_token(
            tools=["kb.search"], ttl_s=60, num_uses=1, meta={}
        )
        with pytest.raises(VaultPermissionDenied):
            await agent.lookup_token(task.token)
        with pytest.raises(VaultPermissionDenied):
            await agent.revoke_accessor(task.accessor)


# -- task tokens -------------------------------------------------------------------------


@pytest.fixture
async def coordinator(mesh: _Mesh) -> AsyncIterator[VaultClient]:
    vault = await VaultClient.from_approle_file(mesh.addr, mesh.creds["coordinator"])
    yield vault
    await vault.close()


@pytest.fixture
async def proxy(mesh: _Mesh) -> AsyncIterator[VaultClient]:
    # Task tokens are bound to the proxy's address: it reaches Vault from there.
    vault = await VaultClient.from_approle_file(
        mesh.addr, mesh.creds["tool-proxy"], source_address=LOCAL_PROXY_SOURCE
    )
    yield vault
    await vault.close()


async def test_task_token_reads_its_tool_and_nothing_else(
    mesh: _Mesh, coordinator: VaultClient, proxy: VaultClient
) -> None:
    task = await coordinator.create_task_token(
        tools=["kb.search"],
        ttl_s=120,
        num_uses=5,
        meta={"workflow": "wf-1", "task": "t-1", "agent": "technical"},
    )
    assert task.policies == ("tool-kb-search",)

    secret = await proxy.read_tool_secret("kb.search", token=task.token)
    assert secret.data == _root_read(mesh, "kb.search")["data"]
    assert secret.version >= 1

    with pytest.raises(VaultPermissionDenied):
        await proxy.read_tool_secret("email.send", token=task.token)


async def test_a_task_token_is_useless_outside_the_tool_proxy(
    mesh: _Mesh, coordinator: VaultClient, proxy: VaultClient
) -> None:
    """The agent holds its task token; Vault honours it only from the proxy's address."""
    task = await coordinator.create_task_token(
        tools=["kb.search"], ttl_s=60, num_uses=3, meta={"agent": "technical"}
    )
    # The agent, calling Vault itself (from its own address, 127.0.0.1 here).
    async with VaultClient(mesh.addr, mesh.creds["agent-technical"]) as agent_side:
        with pytest.raises(VaultPermissionDenied):
            await agent_side.read_tool_secret("kb.search", token=task.token)
    raw = await asyncio.to_thread(
        requests.get,
        f"{mesh.addr}/v1/tool-secrets/data/kb-search",
        headers={"X-Vault-Token": task.token},
        timeout=5,
    )
    assert raw.status_code == 403
    info = await proxy.lookup_token(task.token)
    assert info.num_uses == 3, "a refused request spends no use"

    secret = await proxy.read_tool_secret("kb.search", token=task.token)  # the proxy may
    assert secret.data == _root_read(mesh, "kb.search")["data"]


async def test_token_role_refuses_anything_but_tool_policies(
    mesh: _Mesh, coordinator: VaultClient
) -> None:
    creds = json.loads(mesh.creds["coordinator"].read_text())
    raw = hvac.Client(url=mesh.addr)
    raw.auth.approle.login(creds["role_id"], creds["secret_id"])
    for forbidden in (["coordinator"], ["tool-proxy"], ["tool-kb-search", "root"], ["default"]):
        with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
            raw.auth.token.create(role_name="tessera-task", policies=forbidden, ttl="60s")
    raw.adapter.close()

    with pytest.raises(VaultPermissionDenied):  # a tool that is not in vault/tools.yaml
        await coordinator.create_task_token(tools=["payroll.run"], ttl_s=60, num_uses=1, meta={})
    with pytest.raises(ValueError):  # not a tool name at all: refused before Vault
        await coordinator.create_task_token(tools=["coordinator"], ttl_s=60, num_uses=1, meta={})


async def test_task_token_ttl_is_capped_by_the_role(coordinator: VaultClient) -> None:
    task = await coordinator.create_task_token(
        tools=["kb.search"], ttl_s=24 * 3600, num_uses=1, meta={}
    )
    remaining = (task.expires_at - task.expires_at.now(task.expires_at.tzinfo)).total_seconds()
    assert remaining <= 15 * 60


async def test_use_limit_is_enforced(coordinator: VaultClient, proxy: VaultClient) -> None:
    task = await coordinator.create_task_token(
        tools=["crm.lookup_customer"], ttl_s=60, num_uses=2, meta={"task": "t-uses"}
    )
    assert (await proxy.lookup_token(task.token)).num_uses == 2

    await proxy.read_tool_secret("crm.lookup_customer", token=task.token)
    assert (await proxy.lookup_token(task.token)).num_uses == 1
    await proxy.read_tool_secret("crm.lookup_customer", token=task.token)

    with pytest.raises(VaultPermissionDenied):
        await proxy.read_tool_secret("crm.lookup_customer", token=task.token)
    # The last use already made the token useless (above); Vault then revokes it in the
    # background, so on a busy server a lookup can still find it for a moment.
    give_up = time.monotonic() + 10
    while True:
        try:
            info = await proxy.lookup_token(task.token)
        except InvalidToken:
            break
        assert info.num_uses <= 0, info  # never usable again meanwhile
        assert time.monotonic() < give_up, "a used-up token was never revoked"
        await asyncio.sleep(0.05)


async def test_revoked_token_is_dead_at_once(coordinator: VaultClient, proxy: VaultClient) -> None:
    task = await coordinator.create_task_token(
        tools=["billing.issue_refund"], ttl_s=300, num_uses=10, meta={"workflow": "wf-r"}
    )
    assert (await proxy.lookup_token(task.token)).accessor == task.accessor

    await coordinator.revoke_accessor(task.accessor)

    with pytest.raises(InvalidToken):
        await proxy.lookup_token(task.token)
    with pytest.raises(VaultPermissionDenied):
        await proxy.read_tool_secret("billing.issue_refund", token=task.token)
    await coordinator.revoke_accessor(task.accessor)  # idempotent


async def test_revoking_a_token_vault_is_revoking_itself_is_not_an_error(
    coordinator: VaultClient, proxy: VaultClient
) -> None:
    """A task token's last use makes Vault revoke it in the background; the coordinator
    revoking it at the same moment (its attempt ended) gets "token not found" or
    "invalid accessor": either way the token is gone, which is what revoking wanted."""
    for n in range(20):
        task = await coordinator.create_task_token(
            tools=["billing.issue_refund"], ttl_s=60, num_uses=1, meta={"workflow": f"wf-{n}"}
        )
        await proxy.read_tool_secret("billing.issue_refund", token=task.token)  # its one use
        await coordinator.revoke_accessor(task.accessor)
        with pytest.raises(InvalidToken):
            await proxy.lookup_token(task.token)


async def test_tool_proxy_inspects_task_tokens_but_cannot_read_secrets_itself(
    mesh: _Mesh, coordinator: VaultClient, proxy: VaultClient
) -> None:
    meta = {"workflow": "wf-9", "task": "t-9", "agent": "billing"}
    task = await coordinator.create_task_token(
        tools=["billing.get_invoices", "billing.issue_refund"], ttl_s=90, num_uses=3, meta=meta
    )

    info = await proxy.lookup_token(task.token)
    assert info.meta == meta
    assert info.policies == ("tool-billing-get_invoices", "tool-billing-issue_refund")
    assert info.num_uses == 3  # looking up does not consume a use
    assert 0 < info.ttl_s <= 90
    assert info.role == "tessera-task"
    assert info.renewable is False
    assert info.expire_time is not None

    creds = json.loads(mesh.creds["tool-proxy"].read_text())
    raw = hvac.Client(url=mesh.addr)
    raw.auth.approle.login(creds["role_id"], creds["secret_id"])
    for tool in ("billing.get_invoices", "billing.issue_refund", "kb.search"):
        with pytest.raises(VaultPermissionDenied):
            await proxy.read_tool_secret(tool, token=raw.token)
    raw.adapter.close()

    with pytest.raises(InvalidToken):
        await proxy.lookup_token("s.this-token-does-not-exist")
    with pytest.raises(InvalidToken):
        await proxy.lookup_token("not a token\r\nX-Injected: 1")


# -- secrets stay secret -------------------------------------------------------------------


async def test_no_secret_reaches_logs_or_reprs(
    mesh: _Mesh,
    openbao: OpenBao,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    secrets_dir = tmp_path / "creds"
    creds = apply(openbao.addr, openbao.root_token, VAULT_DIR, secrets_dir)
    async with (
        await VaultClient.from_approle_file(mesh.addr, creds["coordinator"]) as coordinator,
        await VaultClient.from_approle_file(
            mesh.addr, creds["tool-proxy"], source_address=LOCAL_PROXY_SOURCE
        ) as proxy,
    ):
        task = await coordinator.create_task_token(
            tools=["email.send"], ttl_s=60, num_uses=3, meta={"task": "t-log"}
        )
        await proxy.lookup_token(task.token)
        secret = await proxy.read_tool_secret("email.send", token=task.token)
        await coordinator.revoke_accessor(task.accessor)
        reprs = " ".join(map(repr, (task, secret, coordinator, proxy))) + str(task) + str(secret)

    sensitive = {openbao.root_token, task.token, *map(str, secret.data.values())}
    for path in creds.values():
        sensitive.add(json.loads(path.read_text())["secret_id"])
    captured = capsys.readouterr()
    everything = captured.out + captured.err + caplog.text + reprs
    assert "vault_logged_in" in everything  # the logs were captured at all
    leaked = [s for s in sensitive if s in everything]
    assert leaked == []


# -- the client keeps itself alive, and fails closed ---------------------------------------


async def test_client_keeps_a_valid_token_past_its_ttl_and_max_ttl(
    openbao: OpenBao, mesh: _Mesh, tmp_path: Path
) -> None:
    vault_dir = tmp_path / "vault"
    shutil.copytree(VAULT_DIR, vault_dir)
    (vault_dir / "policies" / "renew-probe.hcl").write_text(
        (VAULT_DIR / "policies" / "planner.hcl").read_text()
    )
    (vault_dir / "pki.yaml").unlink()  # its issue_for names identities this copy drops
    (vault_dir / "identities.yaml").write_text(
        "services:\n"
        "  - name: renew-probe\n"
        "    token_ttl: 2s\n"
        "    token_max_ttl: 5s\n"
        "    secret_id_ttl: 10m\n"
    )
    creds = apply(openbao.addr, openbao.root_token, vault_dir, tmp_path / "creds")

    async with await VaultClient.from_approle_file(mesh.addr, creds["renew-probe"]) as vault:
        first = vault.accessor
        started = time.monotonic()

        async def first_token_dead_and_client_alive() -> bool:
            try:
                mesh.root.auth.token.lookup_accessor(first)
                return False
            except hvac.exceptions.InvalidRequest:  # the first token has expired
                pass
            info = await vault.lookup_self()
            return info.policies == ("renew-probe",)

        await _eventually(
            first_token_dead_and_client_alive, timeout_s=20, what="token outlives max TTL"
        )
        assert time.monotonic() - started >= 5 - 0.5
        assert vault.accessor != first


async def test_unreachable_vault_is_unavailable_not_a_hang(mesh: _Mesh) -> None:
    started = time.monotonic()
    with pytest.raises(VaultUnavailable):
        await VaultClient.from_approle_file(
            f"http://127.0.0.1:{free_port()}", mesh.creds["planner"], timeout_s=1.0
        )
    assert time.monotonic() - started < 5


async def test_client_logs_in_again_when_its_token_is_revoked(mesh: _Mesh) -> None:
    async with await VaultClient.from_approle_file(mesh.addr, mesh.creds["coordinator"]) as vault:
        first = vault.accessor
        mesh.root.auth.token.revoke_accessor(first)  # an operator kills the service's token

        task = await vault.create_task_token(tools=["kb.search"], ttl_s=30, num_uses=1, meta={})

        assert vault.accessor != first
        assert task.policies == ("tool-kb-search",)
