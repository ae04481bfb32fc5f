"""Credential rotation under load: `rotate all` (Python API, then one CLI run) while four
agents make governed calls through the real tool proxy, policy service, NATS and OpenBao.

Not one call may fail; afterwards the tool secrets have new versions (the old ones
destroyed), every old secret_id is refused, every new credentials file logs in, and the
audit stream holds `credential_rotated` records that carry no secret.

The OpenBao, vault/ bootstrap (with the test tools), task-token and InvokeTool helpers are
those of test_governed_calls; this module builds its own tool proxy with a 1 s secret cache
so that the new tool secret versions show up in the calls within the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hvac
import hvac.exceptions
import pytest

from tessera.audit import tail
from tessera.v1 import audit_pb2
from tessera.vault import VaultClient
from tessera.vault.naming import TOOL_SECRETS_MOUNT, tool_slug
from tessera.vault.rotation import audit_writer, rotate
from tests.integration.test_governed_calls import (  # noqa: F401 (bao, creds: fixtures)
    REPO,
    Bao,
    Mesh,
    bao,
    creds,
    governed_mesh,
    invoke,
    new_ids,
    task_token,
)

pytestmark = pytest.mark.integration

KB, CRM = "kb.search", "crm.lookup_customer"
CALLERS = 4
GRACE_S = 1.5
"""Between issuing and retiring: above the proxy's 1 s secret cache (as the 35 s default is
above the default 30 s one)."""


@pytest.fixture(scope="module")
async def mesh(nats_url: str, bao: Bao, creds: dict[str, Path]) -> AsyncIterator[Mesh]:  # noqa: F811
    async with governed_mesh(
        nats_url,
        bao,
        creds,
        name="rot",
        secret_cache_ttl_s=1.0,
        vault_attempts=2,
        vault_timeout_s=2.0,
    ) as running:
        yield running


# -- load ---------------------------------------------------------------------------------


@dataclass
class Load:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    versions: dict[str, list[int]] = field(default_factory=lambda: {KB: [], CRM: []})


async def caller(mesh: Mesh, stop: asyncio.Event, load: Load) -> None:
    """Governed calls back to back; a fresh task token (from the coordinator identity,
    whose secret_id is rotated too) every 20 calls."""
    while not stop.is_set():
        wf, task = new_ids()
        try:
            token = await task_token(mesh, wf, task, tools=[KB, CRM], uses=40)
        except Exception as exc:
            load.failures.append(f"task token: {exc!r}")
            await asyncio.sleep(0.05)
            continue
        for n in range(20):
            if stop.is_set():
                return
            tool, args = (KB, {"query": "refunds"}) if n % 2 else (CRM, {"customer_id": "c-7"})
            try:
                response = await invoke(mesh, token.token, wf, task, tool, args)
            except grpc.aio.AioRpcError as exc:
                load.failures.append(f"{tool}: {exc.code().name} {exc.details()}")
                continue
            load.ok += 1
            load.versions[tool].append(version_of(response.result))


def version_of(result: Any) -> int:
    """The secret version a built-in tool reports (a number in the result Struct)."""
    value = result["credential_version"]
    assert isinstance(value, float | int), value
    return int(value)


# -- Vault inspection ---------------------------------------------------------------------


def root(server: Bao) -> hvac.Client:
    return hvac.Client(url=server.addr, token=server.root_token, timeout=10)


def read_creds(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    return {name: json.loads(path.read_text()) for name, path in paths.items()}


def tool_state(server: Bao, tool: str) -> tuple[int, dict[str, Any], str]:
    """(current version, versions metadata, current api_key)."""
    client = root(server)
    meta = client.secrets.kv.v2.read_secret_metadata(
        tool_slug(tool), mount_point=TOOL_SECRETS_MOUNT
    )
    data = client.secrets.kv.v2.read_secret_version(
        tool_slug(tool), mount_point=TOOL_SECRETS_MOUNT, raise_on_deleted_version=True
    )
    return (
        int(meta["data"]["current_version"]),
        dict(meta["data"]["versions"]),
        str(data["data"]["data"]["api_key"]),
    )


def login_refused(server: Bao, cred: dict[str, str]) -> bool:
    client = hvac.Client(url=server.addr, timeout=10)
    try:
        client.auth.approle.login(
            role_id=cred["role_id"], secret_id=cred["secret_id"], use_token=False
        )
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return True
    return False


def secret_id_count(server: Bao, identity: str) -> int:
    resp = root(server).adapter.list(f"/v1/auth/approle/role/{identity}/secret-id")
    return len((resp or {}).get("data", {}).get("keys") or [])


async def run_cli(server: Bao, secrets_dir: Path, namespace: str, nats_url: str) -> str:
    env = {
        **os.environ,
        "VAULT_TOKEN": server.root_token,
        "TESSERA_NATS_URL": nats_url,
        "TESSERA_NAMESPACE": namespace,
        "COLUMNS": "200",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tessera.cli.creds",
        "rotate",
        "all",
        "--addr",
        server.addr,
        "--secrets-dir",
        str(secrets_dir),
        "--grace",
        str(GRACE_S),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = output.decode()
    assert proc.returncode == 0, text
    return text


# -- the story ----------------------------------------------------------------------------


async def test_rotate_all_under_load_fails_no_call(
    mesh: Mesh,
    bao: Bao,  # noqa: F811
    creds: dict[str, Path],  # noqa: F811
    nats_url: str,
) -> None:
    secrets_dir = creds["tool-proxy"].parent
    original = read_creds(creds)
    before = {tool: tool_state(bao, tool) for tool in (KB, CRM)}

    load = Load()
    stop = asyncio.Event()
    callers = [asyncio.create_task(caller(mesh, stop, load)) for _ in range(CALLERS)]
    try:
        await asyncio.sleep(1.0)  # traffic flowing (and the old secrets cached) first

        # 1. The Python API, audited on the mesh's audit stream.
        started = time.monotonic()
        async with audit_writer(nats_url, mesh.topology.namespace) as writer:
            assert writer is not None
            rotations = await rotate(
                bao.addr, bao.root_token, secrets_dir, grace_s=GRACE_S, audit=writer
            )
        api_s = time.monotonic() - started
        assert all(r.ok for r in rotations), [r.error for r in rotations if not r.ok]
        rotated = {r.target.resource for r in rotations}
        assert {f"approle/{name}" for name in creds} <= rotated
        assert {f"tool/{KB}", f"tool/{CRM}"} <= rotated
        middle = read_creds(creds)
        middle_tools = {tool: tool_state(bao, tool) for tool in (KB, CRM)}

        # 2. One CLI run, same traffic.
        output = await run_cli(bao, secrets_dir, mesh.topology.namespace, nats_url)
        assert "rotated" in output and "failed" not in output
        # People's identity token key too (the mesh's Vault has people: vault/humans.yaml).
        assert "identity/oidc/key/tessera-humans: rotated" in output, output

        await asyncio.sleep(1.5)  # past the 1 s secret cache: calls now use the new key
    finally:
        stop.set()
        await asyncio.gather(*callers)

    # Zero failed calls, and real traffic throughout.
    assert load.failures == [], load.failures[:10]
    assert load.ok >= 100, load.ok
    print(f"rotation: {load.ok} calls ok, 0 failed; API rotate all took {api_s:.1f}s")

    # Tool secrets: two new versions, every older one destroyed, the newest in use.
    for tool in (KB, CRM):
        version, versions, api_key = tool_state(bao, tool)
        assert version == before[tool][0] + 2 == middle_tools[tool][0] + 1
        assert all(info["destroyed"] for v, info in versions.items() if int(v) < version)
        assert api_key not in (before[tool][2], middle_tools[tool][2])
        assert load.versions[tool][0] == before[tool][0]
        assert load.versions[tool][-1] == version

    # AppRole: the old secret_ids (bootstrap's and the API run's) are refused, the files log
    # in, exactly one secret_id is left per identity, files stay private.
    current = read_creds(creds)
    for name in creds:
        assert current[name]["role_id"] == original[name]["role_id"]
        assert (
            len(
                {original[name]["secret_id"], middle[name]["secret_id"], current[name]["secret_id"]}
            )
            == 3
        )
        assert await asyncio.to_thread(login_refused, bao, original[name]), name
        assert await asyncio.to_thread(login_refused, bao, middle[name]), name
        assert await asyncio.to_thread(secret_id_count, bao, name) == 1, name
        assert stat.S_IMODE(creds[name].stat().st_mode) == 0o600
    for name in ("tool-proxy", "coordinator", "agent-billing"):
        client = await VaultClient.from_approle_file(bao.addr, creds[name])
        await client.close()
    assert not list(secrets_dir.glob(".*.tmp"))

    # The services logged in with the old secret_ids still serve (their tokens outlive them).
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[KB])
    response = await invoke(mesh, token.token, wf, task, KB, {"query": "after"})
    assert version_of(response.result) == before[KB][0] + 2

    # Audit: issued + retired per target for both runs, never a secret.
    records = [
        entry.record
        async for entry in tail(mesh.js, mesh.topology, n=100_000)
        if entry.record is not None and entry.record.kind == audit_pb2.AUDIT_KIND_CREDENTIAL_ROTATED
    ]
    by_outcome: dict[str, set[str]] = {}
    for record in records:
        by_outcome.setdefault(record.outcome, set()).add(record.resource)
        assert record.actor == "tessera-creds"
    # `rotate all` also adds a version to every audit signing key and rotates the key of
    # people's identity tokens ("rotated", one record each).
    signing = by_outcome.pop("rotated", set())
    assert "identity/oidc/key/tessera-humans" in signing, signing
    signing.discard("identity/oidc/key/tessera-humans")
    assert signing and all(r.startswith("signing/audit-") for r in signing), signing
    assert set(by_outcome) == {"issued", "retired"}
    assert by_outcome["issued"] == by_outcome["retired"] == rotated
    credential_records = [r for r in records if r.outcome != "rotated"]
    assert len(credential_records) == 4 * len(rotated)  # 2 runs x (issued, retired)
    secret_values = [
        value
        for snapshot in (original, middle, current)
        for cred in snapshot.values()
        for value in (cred["secret_id"],)
    ] + [state[2] for state in (*before.values(), *middle_tools.values())]
    secret_values += [tool_state(bao, tool)[2] for tool in (KB, CRM)]
    blob = b"".join(record.SerializeToString() for record in records)
    assert not any(value.encode() in blob for value in secret_values)
