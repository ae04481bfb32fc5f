"""Start and health-check the real NATS, OpenBao and Envoy servers.

Used by both `tessera up` and the test fixtures. Every starter spawns the process (see
:mod:`tessera.launcher.processes`), returns a frozen description of it at once and, unless
``wait=False``, blocks until its health endpoint answers 200. ``wait_ready`` waits for
several in parallel.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tessera.launcher import processes
from tessera.launcher.binaries import find_binary
from tessera.launcher.gateway import Upstream, XdsTls, render
from tessera.launcher.health import http_ok
from tessera.launcher.nats_security import NatsSecurity, route_tls, route_url, security_block
from tessera.runtime.private_files import write_private

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"


class StartFailed(RuntimeError):
    """A component exited or did not become healthy in time."""

    def __init__(self, name: str, reason: str, log_path: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.reason = reason
        self.log_path = log_path


@dataclass(frozen=True)
class NatsServer:
    name: str
    url: str
    monitor_url: str
    pid: int
    log_path: str
    store_dir: str

    @property
    def address(self) -> str:
        return self.url

    @property
    def health_url(self) -> str:
        return f"{self.monitor_url}/healthz?js-enabled-only=true"


@dataclass(frozen=True)
class OpenBaoServer:
    name: str
    addr: str
    pid: int
    log_path: str
    root_token_file: str
    root_token: str = field(repr=False)

    @property
    def address(self) -> str:
        return self.addr

    @property
    def health_url(self) -> str:
        return f"{self.addr}/v1/sys/health"


@dataclass(frozen=True)
class EnvoyServer:
    name: str
    address: str  # host:port of the gRPC listener
    admin_url: str
    pid: int
    log_path: str
    access_log: str
    config_path: str

    @property
    def health_url(self) -> str:
        return f"{self.admin_url}/ready"


Server = NatsServer | OpenBaoServer | EnvoyServer


def _fail(name: str, reason: str, log_path: str) -> StartFailed:
    return StartFailed(name, reason, log_path)


def _exited(pid: int) -> str:
    code = processes.returncode(pid)
    return "exited" if code is None else f"exited with code {code}"


def wait_ready(servers: Sequence[Server], *, timeout: float = 20.0) -> None:
    """Block until every server's health URL answers 200, polling with backoff.

    Raises :class:`StartFailed` naming the first server that exited or is still unhealthy
    at the deadline.
    """
    deadline = time.monotonic() + timeout
    pending = list(servers)
    delay = 0.02
    while pending:
        still: list[Server] = []
        for server in pending:
            if not processes.pid_exists(server.pid):
                raise _fail(server.name, _exited(server.pid), server.log_path)
            if not http_ok(server.health_url, timeout=0.5):
                still.append(server)
        pending = still
        if not pending:
            return
        if time.monotonic() >= deadline:
            server = pending[0]
            raise _fail(server.name, f"not healthy after {timeout:.0f}s", server.log_path)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


@dataclass(frozen=True)
class ClusterMembership:
    """What makes one nats-server a member of a JetStream cluster (see
    :mod:`tessera.launcher.cluster`)."""

    cluster_name: str
    port: int  # this node's route listener
    peer_ports: tuple[int, ...]  # the route listeners of the other members


def nats_config(
    *,
    port: int,
    monitor_port: int,
    server_name: str,
    store: Path,
    cluster: ClusterMembership | None = None,
    security: NatsSecurity | None = None,
) -> str:
    """The nats-server configuration: JetStream on file storage, fsync on every write;
    with ``security``, TLS required from every client (and between routes), each client's
    certificate mapped to its identity's permissions (:mod:`tessera.launcher.nats_security`)."""
    # sync_interval: always -- acknowledged writes must survive a power cut (DESIGN.md).
    text = (
        f"listen: {LOOPBACK}:{port}\n"
        f"http: {LOOPBACK}:{monitor_port}\n"
        f"server_name: {server_name}\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store))}\n"
        "  sync_interval: always\n"
        "}\n"
    )
    if security is not None:
        text += security_block(security)
    if cluster is not None:
        routes = "".join(f"    {route_url(security, LOOPBACK, p)}\n" for p in cluster.peer_ports)
        text += (
            "cluster {\n"
            f"  name: {cluster.cluster_name}\n"
            f"  listen: {LOOPBACK}:{cluster.port}\n"
            + (route_tls(security) if security is not None else "")
            + "  routes: [\n"
            f"{routes}"
            "  ]\n"
            "}\n"
        )
    return text


def start_nats(
    data_dir: Path,
    *,
    port: int,
    monitor_port: int,
    name: str = "nats",
    server_name: str | None = None,
    cluster: ClusterMembership | None = None,
    security: NatsSecurity | None = None,
    wait: bool = True,
    timeout: float = 15.0,
) -> NatsServer:
    """nats-server with JetStream on file storage, fsync on every write; a member of a
    cluster with ``cluster``. ``server_name`` defaults to ``tessera_<name>``."""
    store = data_dir / name
    store.mkdir(parents=True, exist_ok=True)
    config = data_dir / "config" / f"{name}.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    # Private (0600): with security on it holds the route password.
    write_private(
        config,
        nats_config(
            port=port,
            monitor_port=monitor_port,
            server_name=server_name or f"tessera_{name.replace('-', '_')}",
            store=store,
            cluster=cluster,
            security=security,
        ),
    )
    argv = [str(find_binary("nats-server")), "-c", str(config)]
    record = processes.spawn(data_dir, name, argv)
    server = NatsServer(
        name=name,
        url=f"nats://{LOOPBACK}:{port}",
        monitor_url=f"http://{LOOPBACK}:{monitor_port}",
        pid=record.pid,
        log_path=record.log_path,
        store_dir=str(store),
    )
    if wait:
        wait_ready([server], timeout=timeout)
    return server


def _redact_in_place(path: Path, secret_values: Sequence[str]) -> bool:
    """Overwrite each secret in ``path`` with '*' of the same length; True if any found.

    The writer keeps its O_APPEND descriptor; same-length in-place writes never move its
    end of file.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return False
    found = False
    with path.open("r+b") as fh:
        for value in secret_values:
            needle = value.encode()
            start = data.find(needle)
            while start != -1:
                found = True
                fh.seek(start)
                fh.write(b"*" * len(needle))
                start = data.find(needle, start + len(needle))
    return found


def _unseal_keys(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        if line.startswith("Unseal Key:"):
            keys.append(line.split(":", 1)[1].strip())
    return [k for k in keys if k]


def start_openbao(
    data_dir: Path,
    *,
    port: int,
    name: str = "openbao",
    wait: bool = True,
    timeout: float = 20.0,
) -> OpenBaoServer:
    """OpenBao in dev mode (in memory, unsealed) with a random root token.

    The token lives only in ``<data_dir>/secrets/root-token`` (mode 0600). It is passed in
    the environment (not argv, which every user can read), and the dev-mode banner that
    echoes it is redacted from the log once the server is healthy. OpenBao also binds
    ``port + 1`` for its cluster listener.
    """
    token = secrets.token_hex(24)  # dev mode refuses ids with a reserved "s." prefix
    token_file = data_dir / "secrets" / "root-token"
    write_private(token_file, token)
    argv = [
        str(find_binary("bao")),
        "server",
        "-dev",
        f"-dev-listen-address={LOOPBACK}:{port}",
        "-dev-no-store-token",
    ]
    env = {
        **os.environ,
        "BAO_DEV_ROOT_TOKEN_ID": token,
        "HOME": str(data_dir / name),  # nothing touches the user's ~/.vault-token
    }
    (data_dir / name).mkdir(parents=True, exist_ok=True)
    record = processes.spawn(data_dir, name, argv, env=env)
    server = OpenBaoServer(
        name=name,
        addr=f"http://{LOOPBACK}:{port}",
        pid=record.pid,
        log_path=record.log_path,
        root_token_file=str(token_file),
        root_token=token,
    )
    if wait:
        wait_ready([server], timeout=timeout)
        scrub_openbao_log(server)
    return server


def scrub_openbao_log(server: OpenBaoServer, *, timeout: float = 5.0) -> None:
    """Redact the root token and unseal key that dev mode prints, once it has printed them."""
    path = Path(server.log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if "Root Token:" in text:
            _redact_in_place(path, [server.root_token, *_unseal_keys(text)])
            return
        if time.monotonic() >= deadline:
            _redact_in_place(path, [server.root_token])
            log.warning("openbao_banner_not_seen", log=str(path))
            return
        time.sleep(0.05)


def start_envoy(
    data_dir: Path,
    *,
    port: int,
    admin_port: int,
    gateway_dir: Path,
    upstreams: Sequence[Upstream] = (),
    health_upstream: str | None = None,
    xds_address: str | None = None,
    xds_tls: XdsTls | None = None,
    name: str = "envoy",
    wait: bool = True,
    timeout: float = 20.0,
) -> EnvoyServer:
    """Envoy from ``gateway_dir``.

    With ``xds_address`` (the gateway control plane) Envoy takes its listener, routes and
    clusters from it over ADS, and is ready once it has them; the control plane must
    configure its listener on ``port``. Without, it routes gRPC by service name to
    ``upstreams`` from a static bootstrap. Uses a dynamic base id, so any number of
    Envoys (tests, a running mesh) can coexist.
    """
    config = data_dir / "config" / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    access_log = processes.logs_dir(data_dir) / f"{name}-access.log"
    access_log.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        render(
            gateway_dir,
            listen_port=port,
            admin_port=admin_port,
            access_log=access_log,
            upstreams=upstreams,
            health_upstream=health_upstream,
            node_id=name,
            xds_address=xds_address,
            xds_tls=xds_tls,
        )
    )
    argv = [
        # The Envoy binary asks to be SIGTERMed when its parent exits (which `tessera up`
        # does at once), so a small shell stays its parent for its whole life. Stopping the
        # process group stops both; if Envoy exits, the shell exits with its code.
        "/bin/sh",
        "-c",
        '"$@" & wait $!',
        "envoy-keeper",
        str(find_binary("envoy")),
        "-c",
        str(config),
        "--use-dynamic-base-id",
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--file-flush-interval-msec",  # access log visible within 0.5 s (default 10 s)
        "500",
    ]
    record = processes.spawn(data_dir, name, argv)
    server = EnvoyServer(
        name=name,
        address=f"{LOOPBACK}:{port}",
        admin_url=f"http://{LOOPBACK}:{admin_port}",
        pid=record.pid,
        log_path=record.log_path,
        access_log=str(access_log),
        config_path=str(config),
    )
    if wait:
        wait_ready([server], timeout=timeout)
    return server


def stop(data_dir: Path, name: str, *, timeout: float = 10.0) -> processes.StopResult:
    """Stop a component started by this module (or any PID-file-tracked process)."""
    return processes.stop(data_dir, name, timeout=timeout)
