"""The mesh CA as code: ``vault/pki.yaml`` applied to a Vault/OpenBao PKI mount.

The bootstrap (:func:`ensure_pki`) enables the mount, generates the root CA once and writes
one issuing role per identity, each allowed to issue exactly its own SPIFFE ID and DNS name
(see :mod:`tessera.identity.names`). :func:`issue_policy` renders the policy lines that let
an identity use its own role (and the roles ``issue_for`` grants it), appended to that
identity's policy by :func:`tessera.vault._config.load_spec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tessera.identity.names import DEFAULT_TRUST_DOMAIN, WorkloadName
from tessera.vault import _retry
from tessera.vault.errors import VaultConfigError

__all__ = ["PkiSpec", "ensure_pki", "issue_policy", "load_pki_spec"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
_DURATION = r"^[0-9]+(s|m|h)?$"


class PkiSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trust_domain: str = Field(default=DEFAULT_TRUST_DOMAIN, pattern=r"^[a-z0-9]+([.-][a-z0-9]+)*$")
    mount: str = Field(default="mesh-pki", pattern=r"^[a-z][a-z0-9-]*$")
    ca_ttl: str = Field(default="87600h", pattern=_DURATION)
    max_cert_ttl: str = Field(default="24h", pattern=_DURATION)
    issue_for: dict[str, list[str]] = {}
    ip_sans: list[str] = []
    """Identities whose certificates may carry IP SANs: servers their peers dial by
    address (NATS cluster routes verify the route URL's host, an IP on loopback)."""


def load_pki_spec(vault_dir: Path) -> PkiSpec:
    """``vault/pki.yaml``; the defaults when the file is absent."""
    path = vault_dir / "pki.yaml"
    if not path.is_file():
        return PkiSpec()
    try:
        return PkiSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise VaultConfigError(f"invalid {path}: {exc}") from exc


def issue_policy(spec: PkiSpec, identity: str) -> str:
    """The HCL lines granting ``identity`` its own issuing role (and its ``issue_for``)."""
    roles = [identity, *spec.issue_for.get(identity, ())]
    return "".join(
        f"\n# workload certificate for {WorkloadName.of(role, spec.trust_domain)}\n"
        f'path "{spec.mount}/issue/{role}" {{\n  capabilities = ["update"]\n}}\n'
        for role in roles
    )


def _call(what: str, fn: Callable[[], T]) -> T:
    return _retry.call_sync(what, fn)


def _role_config(spec: PkiSpec, identity: str) -> dict[str, Any]:
    name = WorkloadName.of(identity, spec.trust_domain)
    return {
        # Exactly one DNS name and one URI SAN: a role cannot mint anyone else's name.
        "allowed_domains": [name.dns_name],
        "allow_bare_domains": True,
        "allow_subdomains": False,
        "allow_glob_domains": False,
        "allow_wildcard_certificates": False,
        "allow_localhost": False,
        "allow_ip_sans": identity in spec.ip_sans,
        "allowed_uri_sans": [name.spiffe_id],
        "allowed_other_sans": [],
        "enforce_hostnames": True,
        "server_flag": True,
        "client_flag": True,
        "key_type": "ec",
        "key_bits": 256,
        "max_ttl": spec.max_cert_ttl,
        # Short-lived certificates are not revoked one by one; storing each would cost a
        # storage write per issue (an fsync on raft) for nothing.
        "no_store": True,
        "generate_lease": False,
    }


def ensure_pki(client: hvac.Client, spec: PkiSpec, identities: Sequence[str]) -> None:
    """Mount, root CA (generated once, never replaced) and one role per identity."""
    mounts: Mapping[str, Any] = _call("list_mounts", client.sys.list_mounted_secrets_engines)
    mounts = mounts.get("data", mounts)
    existing = mounts.get(f"{spec.mount}/")
    if existing is None:
        _call(
            "enable_pki",
            lambda: client.sys.enable_secrets_engine(
                "pki", path=spec.mount, config={"max_lease_ttl": spec.ca_ttl}
            ),
        )
        log.info("vault_mount_enabled", mount=spec.mount, type="pki")
    elif existing.get("type") != "pki":
        raise VaultConfigError(f"mount {spec.mount}/ exists but is not a PKI engine")
    if not _has_ca(client, spec.mount):
        _call(
            "generate_root",
            lambda: client.write_data(
                f"{spec.mount}/root/generate/internal",
                data={
                    "common_name": f"Tessera mesh CA ({spec.trust_domain})",
                    "ttl": spec.ca_ttl,
                    "key_type": "ec",
                    "key_bits": 256,
                },
            ),
        )
        log.info("vault_mesh_ca_generated", mount=spec.mount, trust_domain=spec.trust_domain)
    for identity in identities:
        config = _role_config(spec, identity)
        _call(
            f"pki_role:{identity}",
            partial(client.write_data, f"{spec.mount}/roles/{identity}", data=config),
        )


def _has_ca(client: hvac.Client, mount: str) -> bool:
    try:
        issuers = _call("list_issuers", lambda: client.list(f"{mount}/issuers"))
    except hvac.exceptions.InvalidPath:
        return False
    return bool(issuers and issuers.get("data", {}).get("keys"))
