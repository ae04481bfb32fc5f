"""Apply the Vault-as-code directory (``vault/``) to a Vault or OpenBao server.

:func:`apply` is idempotent: it creates what is missing, rewrites what differs, and leaves
everything else alone, so it can run on every ``tessera up`` and in CI. Each run also issues
a fresh AppRole secret_id per identity (that is how secret_ids rotate; see vault/README.md).

Only the standard HTTP API is used, so the same code works against HashiCorp Vault. Nothing
here logs a token, a secret_id or a secret value.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import structlog

from tessera.runtime.private_files import write_private
from tessera.vault import _retry
from tessera.vault._config import Identity, VaultSpec, load_spec
from tessera.vault.audit_keys import ensure_audit_keys
from tessera.vault.card_keys import ensure_card_key
from tessera.vault.errors import VaultConfigError, VaultError
from tessera.vault.humans import apply_humans, load_humans
from tessera.vault.naming import APPROLE_MOUNT, TOOL_SECRETS_MOUNT, tool_policy_name, tool_slug
from tessera.vault.pki import ensure_pki

__all__ = ["apply", "render_policies"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_KV_READY_TIMEOUT_S = 15.0
_HTTP_TIMEOUT_S = 10


def render_policies(vault_dir: Path) -> dict[str, str]:
    """Every policy :func:`apply` would write, name -> HCL, without touching Vault.

    Raises:
        VaultConfigError: the directory is invalid.
    """
    return dict(load_spec(vault_dir).policies)


def apply(
    addr: str,
    root_token: str,
    vault_dir: Path,
    secrets_dir: Path,
    *,
    seed_tool_secrets: bool = True,
    task_token_bound_cidrs: Sequence[str] | None = None,
    extra_tools: Sequence[str] = (),
) -> dict[str, Path]:
    """Bring the server at ``addr`` in line with ``vault_dir``; return identity -> credentials.

    Enables the ``tool-secrets/`` KV v2 mount and the ``approle/`` auth method when missing,
    writes every policy, AppRole role and the task token role, and the people of
    ``humans.yaml`` (:mod:`tessera.vault.humans`) when there is one; with ``seed_tool_secrets``,
    writes a random ``{"api_key": ...}`` for each tool that has no secret yet (existing
    secrets are never overwritten). ``task_token_bound_cidrs`` replaces the task token
    role's ``bound_cidrs`` of vault/tools.yaml (where this environment's tool proxies reach
    Vault from). ``extra_tools`` are governed like those of vault/tools.yaml (the
    ``a2a.<name>`` tools of the A2A agent declarations). Then, for every identity,
    fetches its role_id and a new secret_id and writes
    ``<secrets_dir>/<identity>.approle.json`` (mode 0600, directory 0700).

    Raises:
        VaultConfigError: ``vault_dir`` is invalid, ``secrets_dir`` is readable by others,
            or a mount exists with the wrong type.
        VaultUnavailable: the server could not be reached (after bounded retries).
        VaultError: the server refused a write (e.g. the token is not privileged enough).
    """
    spec = load_spec(
        vault_dir, task_token_bound_cidrs=task_token_bound_cidrs, extra_tools=extra_tools
    )
    humans = load_humans(vault_dir)
    _prepare_secrets_dir(secrets_dir)
    client = hvac.Client(url=addr, token=root_token, timeout=_HTTP_TIMEOUT_S)
    try:
        _ensure_kv_v2(client)
        _ensure_approle(client)
        ensure_audit_keys(client)  # transit signing keys + audit HMAC key
        ensure_card_key(client)  # the A2A face's agent-card signing key
        changed = _write_policies(client, spec.policies)
        _write_approle_roles(client, spec.identities)
        ensure_pki(client, spec.pki, [identity.name for identity in spec.identities])
        _write_task_token_role(client, spec)
        seeded = _seed_tool_secrets(client, spec.tools) if seed_tool_secrets else 0
        paths = {
            identity.name: _issue_credentials(client, identity.name, secrets_dir)
            for identity in spec.identities
        }
        if humans is not None:
            (secrets_dir / "humans").mkdir(mode=0o700, exist_ok=True)
            apply_humans(
                client,
                humans,
                vault_addr=addr,
                secrets_dir=secrets_dir,
            )
    except hvac.exceptions.VaultError as exc:
        raise VaultError(f"vault refused the bootstrap: {exc}") from exc
    finally:
        client.adapter.close()
    log.info(
        "vault_bootstrap_applied",
        policies=len(spec.policies),
        policies_changed=changed,
        identities=len(paths),
        tools=len(spec.tools),
        tool_secrets_seeded=seeded,
    )
    return paths


def _call(what: str, fn: Callable[[], T]) -> T:
    return _retry.call_sync(what, fn)


def _data(resp: Any) -> Mapping[str, Any]:
    """Listing endpoints answer with the entries at top level and (newer servers) in data."""
    if isinstance(resp, Mapping):
        inner = resp.get("data")
        return inner if isinstance(inner, Mapping) else resp
    raise VaultError("unexpected response shape from vault")


def _ensure_kv_v2(client: hvac.Client) -> None:
    mounts = _data(_call("list_mounts", client.sys.list_mounted_secrets_engines))
    existing = mounts.get(f"{TOOL_SECRETS_MOUNT}/")
    if existing is not None:
        version = str((existing.get("options") or {}).get("version", "1"))
        if existing.get("type") not in ("kv", "generic") or version != "2":
            raise VaultConfigError(
                f"mount {TOOL_SECRETS_MOUNT}/ exists but is not KV version 2 "
                f"(type={existing.get('type')!r}, version={version!r})"
            )
        return
    _call(
        "enable_kv",
        lambda: client.sys.enable_secrets_engine(
            "kv",
            path=TOOL_SECRETS_MOUNT,
            options={"version": "2"},
            description="Tessera: one secret per tool, read with task tokens",
        ),
    )
    log.info("vault_mount_enabled", mount=TOOL_SECRETS_MOUNT, type="kv-v2")
    # A freshly enabled KV v2 mount refuses requests until its upgrade finishes.
    deadline = time.monotonic() + _KV_READY_TIMEOUT_S
    while True:
        try:
            client.secrets.kv.v2.read_configuration(mount_point=TOOL_SECRETS_MOUNT)
            return
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath, *_retry.RETRYABLE):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _ensure_approle(client: hvac.Client) -> None:
    methods = _data(_call("list_auth", client.sys.list_auth_methods))
    existing = methods.get(f"{APPROLE_MOUNT}/")
    if existing is not None:
        if existing.get("type") != "approle":
            raise VaultConfigError(
                f"auth mount {APPROLE_MOUNT}/ exists with type {existing.get('type')!r}"
            )
        return
    _call(
        "enable_approle",
        lambda: client.sys.enable_auth_method(
            "approle", path=APPROLE_MOUNT, description="Tessera service identities"
        ),
    )
    log.info("vault_auth_enabled", mount=APPROLE_MOUNT, type="approle")


def _write_policies(client: hvac.Client, policies: Mapping[str, str]) -> int:
    changed = 0
    for name, hcl in sorted(policies.items()):
        try:
            current = _call(f"read_policy:{name}", partial(client.sys.read_policy, name))
            current_hcl = _data(current).get("rules") or _data(current).get("policy")
        except hvac.exceptions.InvalidPath:
            current_hcl = None
        if current_hcl == hcl:
            continue
        _call(
            f"write_policy:{name}",
            partial(client.sys.create_or_update_policy, name=name, policy=hcl),
        )
        changed += 1
        log.info("vault_policy_written", policy=name)
    return changed


def _write_approle_roles(client: hvac.Client, identities: tuple[Identity, ...]) -> None:
    for identity in identities:
        params = {
            "token_policies": [identity.policy],
            "token_no_default_policy": True,
            "token_ttl": identity.token_ttl,
            "token_max_ttl": identity.token_max_ttl,
            "token_num_uses": 0,
            "token_type": "service",
            "bind_secret_id": True,
            "secret_id_ttl": identity.secret_id_ttl,
            "secret_id_num_uses": 0,
        }
        _call(
            f"write_role:{identity.name}",
            partial(client.write_data, f"auth/{APPROLE_MOUNT}/role/{identity.name}", data=params),
        )


def _write_task_token_role(client: hvac.Client, spec: VaultSpec) -> None:
    role = spec.task_token_role
    params = {
        "allowed_policies": sorted(tool_policy_name(tool) for tool in spec.tools),
        "disallowed_policies": ["root"],
        "orphan": False,
        "renewable": False,
        "token_explicit_max_ttl": role.token_explicit_max_ttl,
        "token_no_default_policy": True,
        "token_type": "service",
        # Usable only from the tool proxy: an agent holding its token gets 403 from Vault.
        "token_bound_cidrs": list(role.bound_cidrs),
    }
    _call(
        f"write_token_role:{role.name}",
        lambda: client.write_data(f"auth/token/roles/{role.name}", data=params),
    )


def _seed_tool_secrets(client: hvac.Client, tools: tuple[str, ...]) -> int:
    kv = client.secrets.kv.v2
    seeded = 0
    for tool in tools:
        path = tool_slug(tool)
        try:
            _call(
                f"read_secret_metadata:{tool}",
                partial(kv.read_secret_metadata, path=path, mount_point=TOOL_SECRETS_MOUNT),
            )
            continue
        except hvac.exceptions.InvalidPath:
            pass
        try:
            # cas=0: write only if the secret still does not exist (never clobber a rotation).
            _call(
                f"seed_secret:{tool}",
                partial(
                    kv.create_or_update_secret,
                    path=path,
                    secret={"api_key": secrets.token_urlsafe(32)},
                    cas=0,
                    mount_point=TOOL_SECRETS_MOUNT,
                ),
            )
        except hvac.exceptions.InvalidRequest:
            log.info("vault_tool_secret_exists", tool=tool)
            continue
        seeded += 1
        log.info("vault_tool_secret_seeded", tool=tool)
    return seeded


def _prepare_secrets_dir(secrets_dir: Path) -> None:
    if secrets_dir.exists():
        mode = stat.S_IMODE(secrets_dir.stat().st_mode)
        if not secrets_dir.is_dir() or mode & 0o077:
            raise VaultConfigError(
                f"{secrets_dir} must be a directory readable only by its owner "
                f"(mode 0700), found {oct(mode)}"
            )
        return
    secrets_dir.mkdir(mode=0o700, parents=True)
    os.chmod(secrets_dir, 0o700)  # mkdir's mode is filtered by the umask


def _new_secret_id(client: hvac.Client, name: str, *, issued_by: str) -> tuple[str, str, str]:
    """AppRole ``name``'s role_id, a fresh secret_id and that secret_id's accessor."""
    approle = client.auth.approle
    role_id = _call(
        f"read_role_id:{name}",
        lambda: approle.read_role_id(role_name=name, mount_point=APPROLE_MOUNT),
    )["data"]["role_id"]
    issued = _call(
        f"generate_secret_id:{name}",
        lambda: approle.generate_secret_id(
            role_name=name, metadata={"issued_by": issued_by}, mount_point=APPROLE_MOUNT
        ),
    )["data"]
    return role_id, issued["secret_id"], issued["secret_id_accessor"]


def _issue_credentials(client: hvac.Client, name: str, secrets_dir: Path) -> Path:
    role_id, secret_id, _ = _new_secret_id(client, name, issued_by="tessera-bootstrap")
    path = secrets_dir / f"{name}.approle.json"
    write_private(path, json.dumps({"role_id": role_id, "secret_id": secret_id}))
    log.debug("vault_approle_credentials_written", identity=name, path=str(path))
    return path
