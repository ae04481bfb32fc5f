"""`tessera vault bootstrap`: apply vault/ (policies, AppRoles, token role, mounts).

Target: the running local mesh's OpenBao (address from ``<data_dir>/state.json``, root token
from ``<data_dir>/secrets/root-token``: the local bootstrap is the only holder of a root
token), or ``--addr`` with the token from ``VAULT_TOKEN`` (HashiCorp Vault works the same).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tessera.launcher import mesh as launcher
from tessera.launcher import state as mesh_state

app = typer.Typer(
    name="vault",
    help="Apply Vault-as-code (vault/) to OpenBao or HashiCorp Vault.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)


@app.callback()
def _group() -> None:
    """Apply Vault-as-code (vault/) to OpenBao or HashiCorp Vault."""


EXIT_UNAVAILABLE = 2
EXIT_NO_MESH = 3

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar=launcher.DATA_DIR_ENV,
        help="The local mesh's data directory (state.json, secrets/). Default: ./.tessera.",
        show_default=False,
    ),
]
Addr = Annotated[
    str | None,
    typer.Option(
        "--addr",
        help="Vault/OpenBao address; the token is read from VAULT_TOKEN (never an option).",
        show_default=False,
    ),
]
SecretsDir = Annotated[
    Path | None,
    typer.Option(
        "--secrets-dir",
        help="Where <identity>.approle.json files live (default: <data-dir>/secrets).",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class VaultTarget:
    addr: str
    token: str = field(repr=False)
    secrets_dir: Path
    local: bool


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def quiet_logs(verbose: bool = False) -> None:
    from tessera.runtime.logging import configure_logging

    configure_logging("cli", "info" if verbose else "warning", stream=sys.stderr)


def resolve_target(
    data_dir: Path | None, addr: str | None, secrets_dir: Path | None
) -> VaultTarget:
    """``--addr`` + ``VAULT_TOKEN``, else the local mesh recorded in ``data_dir``."""
    directory = (data_dir or launcher.default_data_dir()).resolve()
    secrets = (secrets_dir or directory / "secrets").resolve()
    if addr:
        token = os.environ.get("VAULT_TOKEN", "").strip()
        if not token:
            raise fail("--addr needs the token in the VAULT_TOKEN environment variable")
        return VaultTarget(addr.rstrip("/"), token, secrets, local=False)
    recorded = mesh_state.read(directory)
    bao = next((c for c in recorded.components if c.name == "openbao"), None) if recorded else None
    if bao is None:
        raise fail(
            f"no local mesh with OpenBao is recorded in {directory} "
            "(start one with `tessera up`, or pass --addr with VAULT_TOKEN)",
            EXIT_NO_MESH,
        )
    token_file = directory / "secrets" / "root-token"
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError:
        raise fail(f"cannot read the local root token {token_file}", EXIT_NO_MESH) from None
    return VaultTarget(bao.address.rstrip("/"), token, secrets, local=True)


# -- what would change ----------------------------------------------------------------------


def _exists(fn: Any) -> Any:
    import hvac.exceptions

    try:
        return fn()
    except hvac.exceptions.InvalidPath:
        return None


def plan(
    addr: str,
    token: str,
    vault_dir: Path,
    *,
    task_token_bound_cidrs: list[str] | None = None,
    extra_tools: tuple[str, ...] = (),
) -> list[str]:
    """Human-readable lines: what :func:`tessera.vault.bootstrap.apply` will change."""
    import hvac

    from tessera.vault._config import load_spec
    from tessera.vault.naming import (
        APPROLE_MOUNT,
        TOOL_SECRETS_MOUNT,
        tool_policy_name,
        tool_slug,
    )

    spec = load_spec(
        vault_dir, task_token_bound_cidrs=task_token_bound_cidrs, extra_tools=extra_tools
    )
    client = hvac.Client(url=addr, token=token, timeout=10)
    changes: list[str] = []
    try:
        mounts = client.sys.list_mounted_secrets_engines()
        mounts = mounts.get("data", mounts)
        if f"{TOOL_SECRETS_MOUNT}/" not in mounts:
            changes.append(f"enable KV v2 mount {TOOL_SECRETS_MOUNT}/")
        methods = client.sys.list_auth_methods()
        methods = methods.get("data", methods)
        if f"{APPROLE_MOUNT}/" not in methods:
            changes.append(f"enable auth method {APPROLE_MOUNT}/")
        for name, hcl in sorted(spec.policies.items()):
            current = _exists(lambda n=name: client.sys.read_policy(n))
            if current is None:
                changes.append(f"create policy {name}")
            else:
                body = current.get("data", current)
                if (body.get("rules") or body.get("policy")) != hcl:
                    changes.append(f"update policy {name}")
        for identity in spec.identities:
            role = _exists(
                lambda n=identity.name: client.auth.approle.read_role(n, mount_point=APPROLE_MOUNT)
            )
            if role is None:
                changes.append(f"create AppRole role {identity.name}")
        role_name = spec.task_token_role.name
        role = _exists(lambda: client.read(f"auth/token/roles/{role_name}"))
        if role is None:
            changes.append(f"create token role {role_name}")
        else:
            wanted = {tool_policy_name(tool) for tool in spec.tools}
            current_allowed = set((role.get("data") or {}).get("allowed_policies") or ())
            if current_allowed != wanted:
                changes.append(
                    f"update token role {role_name}: +{len(wanted - current_allowed)} "
                    f"-{len(current_allowed - wanted)} tool policies"
                )
            bound = set((role.get("data") or {}).get("token_bound_cidrs") or ())
            if bound != set(spec.task_token_role.bound_cidrs):
                changes.append(
                    f"update token role {role_name}: bound to "
                    f"{', '.join(spec.task_token_role.bound_cidrs) or 'any address'}"
                )
        if f"{TOOL_SECRETS_MOUNT}/" in mounts:
            for tool in spec.tools:
                meta = _exists(
                    lambda t=tool: client.secrets.kv.v2.read_secret_metadata(
                        path=tool_slug(t), mount_point=TOOL_SECRETS_MOUNT
                    )
                )
                if meta is None:
                    changes.append(f"seed secret of tool {tool}")
        else:
            changes.extend(f"seed secret of tool {tool}" for tool in spec.tools)
        changes.append(
            f"issue a new secret_id for each of {len(spec.identities)} identities and replace "
            "their credentials files (old secret_ids stay valid: `tessera creds rotate "
            "approle <identity>` retires them)"
        )
    finally:
        client.adapter.close()
    return changes


@app.command("bootstrap")
def bootstrap_cmd(
    data_dir: DataDir = None,
    addr: Addr = None,
    secrets_dir: SecretsDir = None,
    vault_dir: Annotated[
        Path | None,
        typer.Option("--vault-dir", help="Vault-as-code directory (default: <project>/vault)."),
    ] = None,
    bound_cidrs: Annotated[
        str | None,
        typer.Option(
            "--task-token-bound-cidrs",
            envvar="TESSERA_VAULT_TASK_TOKEN_BOUND_CIDRS",
            help="Comma-separated CIDRs task tokens may be used from: this environment's "
            "tool proxy addresses (default: bound_cidrs in vault/tools.yaml, the local mesh's).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log to stderr.")] = False,
) -> None:
    """Apply vault/ idempotently and print what changed.

    Exits 0 when applied, 1 when Vault refused or vault/ is invalid, 2 when Vault is
    unreachable, 3 when no local mesh is running (and no --addr was given).
    """
    from tessera.a2a_agents import A2AAgentsSettings, declared_tools
    from tessera.launcher.topology import project_root
    from tessera.vault import VaultConfigError, VaultError, VaultUnavailable
    from tessera.vault.bootstrap import apply
    from tessera.vault.rotation import credentials_lock

    quiet_logs(verbose)
    target = resolve_target(data_dir, addr, secrets_dir)
    directory = (vault_dir or project_root() / "vault").resolve()
    cidrs = [c.strip() for c in bound_cidrs.split(",") if c.strip()] if bound_cidrs else None
    try:
        # The A2A agents declared in TESSERA_A2A_AGENTS_FILE get their tools' scopes too.
        extra = declared_tools(A2AAgentsSettings().a2a_agents_file)
        with credentials_lock(target.secrets_dir):
            changes = plan(
                target.addr,
                target.token,
                directory,
                task_token_bound_cidrs=cidrs,
                extra_tools=extra,
            )
            paths = apply(
                target.addr,
                target.token,
                directory,
                target.secrets_dir,
                task_token_bound_cidrs=cidrs,
                extra_tools=extra,
            )
    except VaultUnavailable as exc:
        raise fail(str(exc), EXIT_UNAVAILABLE) from None
    except (VaultConfigError, VaultError) as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # hvac errors from the plan step and connection failures
        name = type(exc).__name__
        code = EXIT_UNAVAILABLE if "Connection" in name or "Timeout" in name else 1
        raise fail(f"{name}: {exc}", code) from None
    out.print(f"applied {directory} to {target.addr}", highlight=False)
    for line in changes:
        out.print(f"  • {line}", highlight=False, soft_wrap=True)
    out.print(f"credentials: {len(paths)} files in {target.secrets_dir}", highlight=False)


if __name__ == "__main__":
    app()
