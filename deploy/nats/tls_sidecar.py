"""The NATS servers' certificate and cluster routes, kept current beside nats-server.

    python -m deploy.nats.tls_sidecar        # in the NATS pod (k8s) or netns (compose)

nats-server cannot log in to Vault, and its certificate (the ``nats`` identity, 24 h at
most: vault/pki.yaml ``max_cert_ttl``) must be renewed while it runs. This sidecar does for
a deployed NATS node what `tessera up` does locally (tessera/launcher/nats_security.py):

1. logs in with the ``nats`` AppRole (``TESSERA_VAULT_APPROLE_FILE``, injected like every
   other workload's) and issues ``mesh-pki/issue/nats`` with this node's IP address as IP
   SAN, writing key, certificate and CA to ``--dir`` (0600; key first, so a reload between
   the writes never pairs a new certificate with the old key);
2. resolves the peers' names to addresses and writes the ``routes`` of the cluster block
   (``routes.conf``, included by nats.conf). Routes dial by IP because nats-server verifies
   a route peer's certificate against the host of the route URL, and the ``nats`` PKI role
   allows exactly one DNS name (``nats.service.tessera.local``) but any IP: dialing
   ``nats-1.nats-headless`` could never verify, dialing its address does;
3. asks nats-server to reload (SIGHUP, through its pid file; the pod shares its process
   namespace) when either changed, then sleeps until the certificate is two thirds
   through its life or the next peer lookup, whichever comes first.

Clients never depend on these addresses: they verify the server by its DNS name
(``tessera.identity.nats_tls.server_hostname``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hvac
import structlog

from tessera.identity.names import WorkloadName
from tessera.identity.source import PKI_MOUNT

__all__ = ["Options", "main", "render_routes"]

log = structlog.get_logger(__name__)

NATS_IDENTITY = "nats"
KEY_FILE, CERT_FILE, CA_FILE, ROUTES_FILE = "server.key", "server.crt", "ca.crt", "routes.conf"
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Options:
    approle_file: Path
    vault_addr: str
    directory: Path
    self_host: str
    """This node's address, or a name resolving to it: the certificate's IP SAN."""
    peers: tuple[str, ...]
    """Every node's route host (this one included; it is skipped by address)."""
    route_port: int
    route_password: str
    pid_file: Path
    trust_domain: str
    ttl_s: int
    resolve_every_s: float


def _write_private(path: Path, text: str) -> bool:
    """Replace ``path`` atomically (0600); False when it already held ``text``."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return True


def _address(host: str) -> str | None:
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return None  # not in DNS yet (a peer pod still being scheduled): retried later


def render_routes(addresses: list[str], port: int, password: str) -> str:
    """The ``routes`` line of the cluster block for the given peer addresses."""
    urls = ", ".join(
        json.dumps(f"nats-route://route:{password}@{a}:{port}") for a in sorted(addresses)
    )
    return f"routes: [{urls}]\n"


def issue(options: Options, ip: str) -> int:
    """Issue and write this node's certificate; its expiry (Unix seconds)."""
    creds = json.loads(options.approle_file.read_text())
    client = hvac.Client(url=options.vault_addr, timeout=10)
    try:
        client.auth.approle.login(role_id=creds["role_id"], secret_id=creds["secret_id"])
        name = WorkloadName.of(NATS_IDENTITY, options.trust_domain)
        issued = client.write_data(
            f"{PKI_MOUNT}/issue/{NATS_IDENTITY}",
            data={
                "common_name": name.dns_name,
                "uri_sans": name.spiffe_id,
                "ip_sans": ip,
                "ttl": f"{options.ttl_s}s",
            },
        )["data"]
    finally:
        client.adapter.close()
    _write_private(options.directory / KEY_FILE, issued["private_key"])
    _write_private(options.directory / CERT_FILE, issued["certificate"])
    _write_private(
        options.directory / CA_FILE, "\n".join(issued.get("ca_chain") or [issued["issuing_ca"]])
    )
    return int(issued["expiration"])


def reload_nats(pid_file: Path) -> bool:
    """SIGHUP nats-server (it reloads TLS and routes; connections stay); False when it is
    not running yet (it reads the files at start)."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True


def run(options: Options, *, once: bool = False) -> None:
    """Keep the files current forever (``once``: one pass, for the first render)."""
    expiry = 0
    backoff = 1.0
    while True:
        changed = False
        try:
            ip = _address(options.self_host)
            if ip is None:
                raise OSError(f"cannot resolve this node's address {options.self_host!r}")
            if time.time() >= expiry - options.ttl_s / 3:
                expiry = issue(options, ip)
                changed = True
                log.info("nats_certificate_issued", ip=ip, expires=expiry)
            peers = [a for a in (_address(h) for h in options.peers) if a and a != ip]
            routes = render_routes(peers, options.route_port, options.route_password)
            if _write_private(options.directory / ROUTES_FILE, routes):
                changed = True
                log.info("nats_routes_written", peers=sorted(peers))
            backoff = 1.0
        except (OSError, ValueError, KeyError, hvac.exceptions.VaultError) as exc:
            # Bounded backoff; the current certificate stays valid for a third of its life.
            log.warning("nats_tls_sidecar_retry", error=str(exc), retry_in_s=backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            continue
        if changed and reload_nats(options.pid_file):
            log.info("nats_reloaded")
        if once:
            return
        renew_in = max(1.0, expiry - options.ttl_s / 3 - time.time())
        time.sleep(min(renew_in, options.resolve_every_s))


def parse(argv: list[str] | None = None) -> tuple[Options, bool]:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(env.get("NATS_TLS_DIR", "/etc/nats-tls")))
    parser.add_argument("--self", dest="self_host", default=env.get("NATS_SELF_HOST", ""))
    parser.add_argument("--peers", default=env.get("NATS_PEERS", ""), help="comma-separated")
    parser.add_argument("--route-port", type=int, default=6222)
    parser.add_argument("--pid-file", type=Path, default=Path("/var/run/nats/nats.pid"))
    parser.add_argument("--ttl-s", type=int, default=24 * 3600)
    parser.add_argument("--resolve-every-s", type=float, default=15.0)
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    if not args.self_host or not args.peers:
        parser.error("--self and --peers (or NATS_SELF_HOST, NATS_PEERS) are required")
    approle = env.get("TESSERA_VAULT_APPROLE_FILE")
    password = env.get("NATS_ROUTE_PASSWORD", "")
    if not approle or not password:
        parser.error("TESSERA_VAULT_APPROLE_FILE and NATS_ROUTE_PASSWORD must be set")
    options = Options(
        approle_file=Path(approle),
        vault_addr=env.get("TESSERA_VAULT_ADDR", "http://127.0.0.1:8200"),
        directory=args.dir,
        self_host=args.self_host,
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        route_port=args.route_port,
        route_password=password,
        pid_file=args.pid_file,
        trust_domain=env.get("TESSERA_TRUST_DOMAIN", "tessera.local"),
        ttl_s=args.ttl_s,
        resolve_every_s=args.resolve_every_s,
    )
    return options, args.once


def main(argv: list[str] | None = None) -> int:
    options, once = parse(argv)
    options.directory.mkdir(parents=True, exist_ok=True)
    run(options, once=once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
