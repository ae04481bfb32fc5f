"""TLS and authentication for the local mesh's NATS.

`tessera up` issues the ``nats`` identity's certificate (vault/identities.yaml) once
OpenBao is bootstrapped, writes it to ``<data_dir>/secrets/nats/`` (0600) and starts
nats-server requiring TLS from every client and between cluster routes, with
``verify_and_map``: a client's certificate DNS name is its user, and each user has the
permissions :mod:`tessera.runtime.nats_permissions` gives its identity. A connection
without a certificate of the mesh CA is refused.

The server certificate lives as long as the PKI roles allow (``max_cert_ttl``, 24 h):
`tessera creds rotate nats` (part of ``all``) issues a fresh one and has every server reload
it with no downtime (established connections stay; new handshakes see the new one);
`tessera restart nats` or `up` again issue one too.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tessera.launcher import processes
from tessera.launcher.operator import OperatorIdentity, local_identity
from tessera.runtime.bus import Topology
from tessera.runtime.nats_permissions import render_authorization
from tessera.runtime.private_files import write_private

__all__ = [
    "NATS_IDENTITY",
    "NatsSecurity",
    "issue_server_certificate",
    "rotate_server_certificate",
    "route_tls",
    "route_url",
    "security_block",
]

NATS_IDENTITY = "nats"
SERVER_CERT_TTL_S = 24 * 3600


@dataclass(frozen=True)
class NatsSecurity:
    cert_file: Path
    key_file: Path
    ca_file: Path
    authorization: str
    """The ``authorization { users: [...] }`` block."""
    route_password: str = ""
    """What a cluster member presents on its routes, beside its certificate: a mesh
    certificate alone (any workload's) must not let a process join the cluster."""


def _issue(data_dir: Path, vault_addr: str) -> OperatorIdentity:
    # 127.0.0.1: cluster routes dial their peers by address and check it (vault/pki.yaml).
    issued = local_identity(
        data_dir,
        vault_addr,
        NATS_IDENTITY,
        ttl_s=SERVER_CERT_TTL_S,
        ip_sans=("127.0.0.1",),
        reuse=False,
    )
    if issued is None:
        raise RuntimeError("no nats AppRole in the secrets directory: run the Vault bootstrap")
    return issued


def issue_server_certificate(
    data_dir: Path, vault_addr: str, identities: Iterable[str], namespace: str
) -> NatsSecurity:
    """The server's certificate files and the users of every identity."""
    issued = _issue(data_dir, vault_addr)
    security = NatsSecurity(
        **_server_files(data_dir),
        authorization=render_authorization(
            [i for i in identities if i != NATS_IDENTITY], Topology(namespace)
        ),
        route_password=secrets.token_urlsafe(24),
    )
    _write_server_files(_server_files(data_dir), issued)
    return security


def _server_files(data_dir: Path) -> dict[str, Path]:
    directory = data_dir / "secrets" / "nats"
    return {
        "cert_file": directory / "server.crt",
        "key_file": directory / "server.key",
        "ca_file": directory / "ca.crt",
    }


def _write_server_files(files: dict[str, Path], issued: OperatorIdentity) -> None:
    # Key first: a reload between the two writes must not pair a new certificate with
    # the old key (nats-server would refuse the pair and keep the old one, still valid).
    write_private(files["key_file"], issued.private_key)
    write_private(files["cert_file"], issued.certificate)
    write_private(files["ca_file"], issued.ca)


def rotate_server_certificate(data_dir: Path, vault_addr: str) -> list[str]:
    """Issue a fresh server certificate, put it in place and SIGHUP every NATS server of
    the mesh in ``data_dir`` (nats-server reloads TLS on it); the servers reloaded.

    Raises:
        RuntimeError: no ``nats`` AppRole, or no NATS server of this mesh is running.
    """
    _write_server_files(_server_files(data_dir), _issue(data_dir, vault_addr))
    names = [n for n in processes.recorded_names(data_dir) if n == "nats" or n.startswith("nats-n")]
    reloaded = [n for n in names if processes.reload(data_dir, n)]
    if not reloaded:
        raise RuntimeError(f"no NATS server of the mesh in {data_dir} is running")
    return reloaded


def security_block(security: NatsSecurity) -> str:
    """The nats.conf lines: client TLS (certificates required and mapped to users), the
    users (routes: :func:`route_tls`)."""
    files = (
        f"  cert_file: {json.dumps(str(security.cert_file))}\n"
        f"  key_file: {json.dumps(str(security.key_file))}\n"
        f"  ca_file: {json.dumps(str(security.ca_file))}\n"
    )
    text = "tls {\n" + files + "  verify_and_map: true\n  timeout: 2\n}\n" + security.authorization
    return text


def route_url(security: NatsSecurity | None, host: str, port: int) -> str:
    """A route to a peer, with the route credentials when the cluster requires them."""
    if security is None or not security.route_password:
        return f"nats-route://{host}:{port}"
    return f"nats-route://route:{security.route_password}@{host}:{port}"


def route_tls(security: NatsSecurity) -> str:
    """The ``tls`` and ``authorization`` blocks inside ``cluster {}``: routes present a
    certificate of the mesh CA naming the ``nats`` identity's address, and the route
    password."""
    auth = (
        f'  authorization {{ user: "route", password: "{security.route_password}" }}\n'
        if security.route_password
        else ""
    )
    return auth + (
        "  tls {\n"
        f"    cert_file: {json.dumps(str(security.cert_file))}\n"
        f"    key_file: {json.dumps(str(security.key_file))}\n"
        f"    ca_file: {json.dumps(str(security.ca_file))}\n"
        "    verify: true\n"
        "    timeout: 2\n"
        "  }\n"
    )
