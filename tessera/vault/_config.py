"""Load and validate the Vault-as-code directory (``vault/``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tessera.vault.errors import VaultConfigError
from tessera.vault.naming import (
    AGENT_PREFIX,
    LOCAL_PROXY_SOURCE,
    TOOL_SECRETS_MOUNT,
    agent_identity,
    is_valid_identity_name,
    is_valid_tool_name,
    tool_policy_name,
    tool_slug,
)
from tessera.vault.pki import PkiSpec, issue_policy, load_pki_spec

_DURATION = r"^[0-9]+(s|m|h)?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleTTLs(_Model):
    token_ttl: str | None = Field(default=None, pattern=_DURATION)
    token_max_ttl: str | None = Field(default=None, pattern=_DURATION)
    secret_id_ttl: str | None = Field(default=None, pattern=_DURATION)


class IdentityEntry(RoleTTLs):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_identity_name(value):
            raise ValueError("identity names are lower-case kebab-case")
        return value


class IdentitiesFile(_Model):
    defaults: RoleTTLs = RoleTTLs(token_ttl="1h", token_max_ttl="24h", secret_id_ttl="720h")
    services: list[IdentityEntry]
    agents: list[IdentityEntry] = []


class ToolEntry(_Model):
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_tool_name(value):
            raise ValueError("tool names are dotted lower-case, e.g. 'crm.lookup_customer'")
        return value


class TaskTokenRole(_Model):
    # Fixed: the coordinator's client creates task tokens through this exact role.
    name: Literal["tessera-task"] = "tessera-task"
    token_explicit_max_ttl: str = Field(default="15m", pattern=_DURATION)
    bound_cidrs: list[str] = Field(default_factory=lambda: [f"{LOCAL_PROXY_SOURCE}/32"])
    """Where task tokens may be used from: the tool proxy's addresses only, so an agent
    holding its task token cannot read a tool secret from Vault itself."""

    @field_validator("bound_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise ValueError(f"not a CIDR block: {cidr!r}") from exc
        return value


class ToolsFile(_Model):
    tools: list[ToolEntry]
    task_token_role: TaskTokenRole = TaskTokenRole()


class Identity(_Model):
    """One AppRole identity: role name = policy name = identity name."""

    name: str
    policy: str
    token_ttl: str
    token_max_ttl: str
    secret_id_ttl: str


class VaultSpec(_Model):
    """Everything the bootstrap writes, fully resolved."""

    pki: PkiSpec
    policies: dict[str, str]
    identities: tuple[Identity, ...]
    tools: tuple[str, ...]
    task_token_role: TaskTokenRole


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise VaultConfigError(f"cannot read {path}: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VaultConfigError(f"cannot read {path}: {exc}") from exc


def _add(policies: dict[str, str], name: str, hcl: str) -> None:
    """Policy names are global in Vault: two sources for one name is a config error."""
    if name in policies:
        raise VaultConfigError(f"policy name {name!r} is defined twice")
    policies[name] = hcl


def _resolve(entry: IdentityEntry, defaults: RoleTTLs, name: str, path: Path) -> Identity:
    ttls = {
        key: getattr(entry, key) or getattr(defaults, key)
        for key in ("token_ttl", "token_max_ttl", "secret_id_ttl")
    }
    missing = [key for key, value in ttls.items() if value is None]
    if missing:
        raise VaultConfigError(f"{path}: identity {name!r} has no {', '.join(missing)}")
    return Identity(name=name, policy=name, **ttls)


def load_spec(
    vault_dir: Path,
    *,
    task_token_bound_cidrs: Sequence[str] | None = None,
    extra_tools: Sequence[str] = (),
) -> VaultSpec:
    """Read ``identities.yaml``, ``tools.yaml`` and ``policies/`` into a :class:`VaultSpec`;
    ``task_token_bound_cidrs`` (an environment's proxy addresses) replaces the file's.
    ``extra_tools`` are governed like the tools of ``tools.yaml`` (a secret and a policy
    each): the ``a2a.<name>`` tools of the A2A agent declarations (tessera/a2a_agents.py).

    Raises:
        VaultConfigError: a file is missing or invalid, or two names collide.
    """
    ids_path = vault_dir / "identities.yaml"
    tools_path = vault_dir / "tools.yaml"
    policy_dir = vault_dir / "policies"
    try:
        ids = IdentitiesFile.model_validate(_read_yaml(ids_path))
        tools = ToolsFile.model_validate(_read_yaml(tools_path))
        if task_token_bound_cidrs is not None:
            role = tools.task_token_role.model_dump()
            role["bound_cidrs"] = list(task_token_bound_cidrs)
            tools.task_token_role = TaskTokenRole.model_validate(role)
    except ValidationError as exc:
        raise VaultConfigError(f"invalid Vault-as-code in {vault_dir}: {exc}") from exc

    policies: dict[str, str] = {}
    identities: list[Identity] = []

    for entry in ids.services:
        if entry.name.startswith(AGENT_PREFIX):
            raise VaultConfigError(f"{ids_path}: service name {entry.name!r} starts with agent-")
        hcl = policy_dir / f"{entry.name}.hcl"
        if not hcl.is_file():
            raise VaultConfigError(f"service {entry.name!r} has no policy file {hcl}")
        _add(policies, entry.name, _read_text(hcl))
        identities.append(_resolve(entry, ids.defaults, entry.name, ids_path))

    agent_tmpl = Template(_read_text(policy_dir / "templates" / "agent.hcl.tmpl"))
    for entry in ids.agents:
        name = agent_identity(entry.name)
        override = policy_dir / f"{name}.hcl"
        _add(
            policies,
            name,
            _read_text(override) if override.is_file() else agent_tmpl.substitute(agent=entry.name),
        )
        identities.append(_resolve(entry, ids.defaults, name, ids_path))

    tool_names = [t.name for t in tools.tools]
    for extra in extra_tools:
        try:
            ToolEntry(name=extra)
        except ValidationError as exc:
            raise VaultConfigError(f"invalid extra tool name {extra!r}: {exc}") from exc
        if extra not in tool_names:
            tool_names.append(extra)

    tool_tmpl = Template(_read_text(policy_dir / "templates" / "tool.hcl.tmpl"))
    for name in tool_names:
        _add(
            policies,
            tool_policy_name(name),
            tool_tmpl.substitute(tool=name, tool_slug=tool_slug(name), mount=TOOL_SECRETS_MOUNT),
        )

    pki = load_pki_spec(vault_dir)
    known = {identity.name for identity in identities}
    for issuer, targets in pki.issue_for.items():
        unknown = sorted({issuer, *targets} - known)
        if unknown:
            raise VaultConfigError(f"{vault_dir / 'pki.yaml'}: unknown identities {unknown}")
    for identity in identities:
        policies[identity.policy] += issue_policy(pki, identity.name)

    return VaultSpec(
        pki=pki,
        policies=policies,
        identities=tuple(identities),
        tools=tuple(tool_names),
        task_token_role=tools.task_token_role,
    )
