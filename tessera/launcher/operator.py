"""The operator's workload identity: what the launcher and the CLI present to the mesh's
mTLS servers (health probes, `tessera status`, administration RPCs).

`tessera up` bootstraps an ``operator`` AppRole (vault/identities.yaml) like every other
identity; here the CLI logs in with it and issues a short-lived certificate, kept in
``<data_dir>/secrets/operator-cert.json`` (0600) until it is within a few minutes of expiry,
so a quick `tessera status` does not ask Vault every time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hvac

from tessera.identity.names import WorkloadName
from tessera.identity.nats_tls import context_from_pem, inbox_prefix, server_hostname
from tessera.identity.source import PKI_MOUNT
from tessera.runtime.private_files import write_private

__all__ = ["OPERATOR", "OperatorIdentity", "local_identity", "operator_identity"]

OPERATOR = "operator"
_TTL_S = 3600
_REUSE_MARGIN_S = 300


@dataclass(frozen=True)
class OperatorIdentity:
    certificate: str
    private_key: str
    ca: str
    expiration: int
    trust_domain: str
    identity: str = OPERATOR
    """Whose certificate this is (``local_identity`` issues one for any identity)."""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.encode(),
            private_key=self.private_key.encode(),
            certificate_chain=self.certificate.encode(),
        )

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`tessera.runtime.bus.connect` (TLS as this identity,
        and its inbox prefix: the only inboxes its NATS permissions let it read)."""
        return {
            "tls": context_from_pem(self.certificate, self.private_key, self.ca),
            "tls_hostname": server_hostname(self.trust_domain),
            "inbox_prefix": inbox_prefix(self.identity),
        }

    def options_for(self, identity: str) -> list[tuple[str, str]]:
        """Channel options that verify the server is ``identity`` (a component name)."""
        name = WorkloadName.of(identity, self.trust_domain)
        return [("grpc.ssl_target_name_override", name.dns_name)]

    def __repr__(self) -> str:
        return f"OperatorIdentity(expiration={self.expiration})"


def operator_identity(
    data_dir: Path, vault_addr: str, *, trust_domain: str = "tessera.local"
) -> OperatorIdentity | None:
    """A valid operator certificate for the mesh in ``data_dir``; None when the mesh has no
    operator AppRole (an older data directory)."""
    return local_identity(data_dir, vault_addr, OPERATOR, trust_domain=trust_domain)


def local_identity(
    data_dir: Path,
    vault_addr: str,
    identity: str,
    *,
    trust_domain: str = "tessera.local",
    ttl_s: int = _TTL_S,
    ip_sans: tuple[str, ...] = (),
    reuse: bool = True,
) -> OperatorIdentity | None:
    """A certificate of ``identity`` from its AppRole file in ``<data_dir>/secrets`` (the
    local mesh's bootstrap writes one per identity); cached there until near expiry
    (``reuse=False``: always a fresh one, e.g. a server certificate at every start)."""
    secrets_dir = data_dir / "secrets"
    cached = secrets_dir / f"{identity}-cert.json"
    try:
        found = OperatorIdentity(**{**json.loads(cached.read_text()), "identity": identity})
        if reuse and found.expiration - time.time() > _REUSE_MARGIN_S:
            return found
    except (OSError, ValueError, TypeError):
        pass
    approle = secrets_dir / f"{identity}.approle.json"
    try:
        creds = json.loads(approle.read_text())
    except (OSError, ValueError):
        return None
    client = hvac.Client(url=vault_addr, timeout=5)
    try:
        client.auth.approle.login(role_id=creds["role_id"], secret_id=creds["secret_id"])
        name = WorkloadName.of(identity, trust_domain)
        issued = client.write_data(
            f"{PKI_MOUNT}/issue/{identity}",
            data={
                "common_name": name.dns_name,
                "uri_sans": name.spiffe_id,
                "ttl": f"{ttl_s}s",
                **({"ip_sans": ",".join(ip_sans)} if ip_sans else {}),
            },
        )["data"]
    finally:
        client.adapter.close()
    found = OperatorIdentity(
        certificate=issued["certificate"],
        private_key=issued["private_key"],
        ca="\n".join(issued.get("ca_chain") or [issued["issuing_ca"]]),
        expiration=int(issued["expiration"]),
        trust_domain=trust_domain,
        identity=identity,
    )
    write_private(cached, json.dumps(found.__dict__))
    return found
