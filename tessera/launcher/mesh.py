"""Orchestrate the local mesh: `up`, `status` and `down` over one data directory.

Start order: NATS (one server, or a JetStream cluster with ``nats_cluster``) and OpenBao
are spawned; then at once: NATS awaited and every stream and bucket declared, OpenBao
awaited and the Vault bootstrap applied, the gateway's descriptor set built. Then every
service of the topology and Envoy are spawned and all awaited together. Stop order is the reverse.
When the topology has the gateway control plane (``services.gateway``), Envoy takes its
configuration from it over ADS (and is only ready once it has it); the descriptor set
for HTTP/JSON transcoding is built with buf first. Otherwise Envoy gets static routes.
Nothing here prints: callers (the CLI, tests) present the results and errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tessera import a2a_agents
from tessera.launcher import cluster, infra, nats_security, openbao, processes
from tessera.launcher import state as state_file
from tessera.launcher.descriptors import DescriptorBuildFailed, build_descriptor_set
from tessera.launcher.gateway import CONTROL_PLANE_MODULE, Upstream, XdsTls
from tessera.launcher.health import Health, accepts, grpc_health, http_ok
from tessera.launcher.operator import OperatorIdentity, operator_identity
from tessera.launcher.ports import ensure_free, preferred_port
from tessera.launcher.processes import StopResult
from tessera.launcher.state import Component, MeshState
from tessera.launcher.topology import ServiceSpec, Topology, project_root
from tessera.launcher.topology import load as load_topology
from tessera.runtime.config import CommonSettings
from tessera.vault.humans import issuer_of

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_DATA_DIR = Path(".tessera")
DATA_DIR_ENV = "TESSERA_DATA_DIR"

# Preferred ports when free (the usual defaults of each server); otherwise the kernel picks.
DEFAULT_PORTS = {
    "nats": 4222,
    "nats-monitor": 8222,
    "openbao": 8200,  # OpenBao dev mode also binds 8201 for its cluster listener
    "gateway": 8080,
    "gateway-admin": 9901,
}
FIRST_SERVICE_PORT = 50051
# Offsets from --base-port. OpenBao takes two ports (+2, +3).
BASE_OFFSETS = {"nats": 0, "nats-monitor": 1, "openbao": 2, "gateway": 4, "gateway-admin": 5}
FIRST_SERVICE_OFFSET = 10
# A NATS cluster (`up(nats_cluster=N)`) replaces "nats"/"nats-monitor": node i (0-based)
# has client, monitor and route ports at the preferred 4222+i, 8222+i, 6222+i, or with
# --base-port at base + CLUSTER_OFFSET + 3i (+0, +1, +2).
CLUSTER_PREFERRED = {"": 4222, "-monitor": 8222, "-cluster": 6222}
CLUSTER_OFFSET = 100

Reporter = Callable[[str], None]


A2A_BRIDGE = ServiceSpec(
    name=f"agent-{a2a_agents.BRIDGE_AGENT}",
    module="services.agents.a2a_bridge",
    env="AGENT_A2A_BRIDGE",
    identity=f"agent-{a2a_agents.BRIDGE_AGENT}",
    health=("tessera.v1.AgentService",),
    public=False,
)
"""The A2A bridge agent, started only when TESSERA_A2A_AGENTS_FILE declares an agent."""


class MeshError(RuntimeError):
    """Base of the errors `up`/`down`/`status` report to the user as one line."""


class AlreadyRunning(MeshError):
    def __init__(self, data_dir: Path, state: MeshState) -> None:
        super().__init__(
            f"the mesh in {data_dir} is already running (gateway {state.gateway}); "
            "run `tessera down` first"
        )
        self.state = state


class ComponentFailed(MeshError):
    """A component did not come up; everything started before it has been stopped."""

    def __init__(self, name: str, reason: str, log_path: str, log_tail: str) -> None:
        super().__init__(f"{name} {reason} (log: {log_path})")
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.log_tail = log_tail


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    kind: str
    address: str
    pid: int
    health: Health


def default_data_dir() -> Path:
    """``$TESSERA_DATA_DIR`` or ``./.tessera``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Serialise `up`/`down` on one data dir across processes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def plan_ports(
    topology: Topology, *, base_port: int | None = None, nats_cluster: int = 0
) -> dict[str, int]:
    """Choose every port and check it is free (raises ``PortInUse`` naming the first taken).

    With ``base_port`` the layout is fixed (see ``BASE_OFFSETS``); without it each
    component gets its usual port when free, else one the kernel picks. With
    ``nats_cluster`` nodes, the NATS ports are per node (``nats-n1``, ``nats-n1-monitor``,
    ``nats-n1-cluster``…; see ``CLUSTER_OFFSET``).
    """
    ports: dict[str, int] = {}
    single_nats = nats_cluster == 0
    if base_port is not None:
        for name, offset in BASE_OFFSETS.items():
            if single_nats or not name.startswith("nats"):
                ports[name] = base_port + offset
        for index, spec in enumerate(topology.services):
            ports[spec.name] = base_port + FIRST_SERVICE_OFFSET + index
        for index in range(nats_cluster):
            for slot, suffix in enumerate(CLUSTER_PREFERRED):
                ports[cluster.node_name(index) + suffix] = (
                    base_port + CLUSTER_OFFSET + 3 * index + slot
                )
    else:
        wanted = {
            name: port
            for name, port in DEFAULT_PORTS.items()
            if single_nats or not name.startswith("nats")
        }
        for index in range(nats_cluster):
            for suffix, preferred in CLUSTER_PREFERRED.items():
                wanted[cluster.node_name(index) + suffix] = preferred + index
        for index, spec in enumerate(topology.services):
            wanted[spec.name] = FIRST_SERVICE_PORT + index
        for name, preferred in wanted.items():
            taken = set(ports.values())
            if "openbao" in ports:
                taken.add(ports["openbao"] + 1)
            ports[name] = preferred_port(preferred, exclude=taken, pair=name == "openbao")
    for name, port in ports.items():
        ensure_free(name, port)
    ensure_free("openbao cluster listener", ports["openbao"] + 1)
    return ports


def _service_env(
    spec: ServiceSpec,
    topology: Topology,
    ports: Mapping[str, int],
    *,
    nats_url: str,
    jetstream_replicas: int,
    vault_addr: str,
    approles: Mapping[str, Path],
    log_level: str,
    nats_tls: bool = False,
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TESSERA_NATS_URL": nats_url,
            "TESSERA_JETSTREAM_REPLICAS": str(jetstream_replicas),
            "TESSERA_VAULT_ADDR": vault_addr,
            "TESSERA_LOG_LEVEL": log_level,
            # Every process `up` starts has a workload certificate and refuses plaintext.
            "TESSERA_INSECURE_PLAINTEXT": "0",
            "TESSERA_NATS_TLS": "1" if nats_tls else "0",
            f"TESSERA_{spec.env}_LISTEN": f"{LOOPBACK}:{ports[spec.name]}",
        }
    )
    for other in topology.services:
        env[f"TESSERA_{other.env}_ADDRESS"] = f"{LOOPBACK}:{ports[other.name]}"
    if "gateway" in ports:  # where outside callers reach the mesh (the A2A face's cards)
        env["TESSERA_PUBLIC_URL"] = f"http://{LOOPBACK}:{ports['gateway']}"
    approle = approles.get(spec.identity)
    if approle is not None:
        env["TESSERA_VAULT_APPROLE_FILE"] = str(approle)
    else:
        env.pop("TESSERA_VAULT_APPROLE_FILE", None)
    return env


def _bootstrap_vault(
    server: infra.OpenBaoServer,
    project: Path,
    data_dir: Path,
    report: Reporter,
    *,
    extra_tools: tuple[str, ...] = (),
) -> dict[str, Path] | None:
    """Run ``tessera.vault.bootstrap.apply`` if that module exists; None when skipped."""
    try:
        bootstrap = importlib.import_module("tessera.vault.bootstrap")
    except ModuleNotFoundError as exc:
        if exc.name not in ("tessera.vault", "tessera.vault.bootstrap"):
            raise
        log.warning("vault_bootstrap_skipped", reason="tessera.vault.bootstrap not installed")
        report("vault bootstrap skipped: tessera.vault.bootstrap is not installed")
        return None
    secrets_dir = data_dir / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        approles: dict[str, Path] = bootstrap.apply(
            server.addr, server.root_token, project / "vault", secrets_dir, extra_tools=extra_tools
        )
    except Exception as exc:  # any bootstrap failure stops `up` with one clear line
        log.error("vault_bootstrap_failed", error_type=type(exc).__name__)
        raise infra.StartFailed(
            "vault bootstrap", f"failed: {type(exc).__name__}: {exc}", server.log_path
        ) from exc
    return approles


def probe_identity(data_dir: Path, components: Sequence[Component]) -> OperatorIdentity | None:
    """The operator certificate the launcher probes mTLS services with (None: the mesh has
    no OpenBao or no operator identity, e.g. a stand-in topology)."""
    vault = next((c for c in components if c.name == "openbao"), None)
    if vault is None:
        return None
    return operator_identity(data_dir, vault.address)


async def _health(
    component: Component, rpc_timeout: float, operator: OperatorIdentity | None
) -> Health:
    if operator is None:
        return await grpc_health(component.address, component.health, rpc_timeout=rpc_timeout)
    return await grpc_health(
        component.address,
        component.health,
        rpc_timeout=rpc_timeout,
        credentials=operator.credentials(),
        options=operator.options_for(component.name),
    )


async def wait_service(
    component: Component, deadline: float, operator: OperatorIdentity | None = None
) -> None:
    """Poll grpc.health.v1 until every name is SERVING; fail fast if the process exits.
    ``deadline`` is on the running loop's clock; ``operator`` makes the probe mTLS.

    Until the port accepts connections (a service binds it just before it reports
    SERVING) the poll is a plain TCP connect every 20-50 ms; the mTLS health probe, a
    handshake on both sides, runs only once something listens, backing off to 0.3 s
    while the server answers but is not SERVING yet. So the time to SERVING this reports
    (`tessera restart`, the chaos suite) is late by tens of ms, not by up to 0.3 s."""
    loop = asyncio.get_running_loop()
    delay = 0.02
    health = Health.DOWN
    while True:
        if not processes.pid_exists(component.pid):
            code = processes.returncode(component.pid)
            reason = "exited" if code is None else f"exited with code {code}"
            raise infra.StartFailed(component.name, reason, component.log_path)
        timeout = max(0.05, min(1.0, deadline - loop.time()))
        listening = await accepts(component.address, connect_s=timeout)
        if listening:
            health = await _health(component, timeout, operator)
            if health is Health.SERVING:
                return
        if loop.time() >= deadline:
            raise infra.StartFailed(
                component.name,
                f"not SERVING after the deadline ({health.value})",
                component.log_path,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.3 if listening else 0.05)


async def _wait_all(
    services: list[Component],
    gateway: infra.EnvoyServer,
    budget: float,
    operator: OperatorIdentity | None,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    tasks = [asyncio.create_task(wait_service(c, deadline, operator)) for c in services]
    tasks.append(
        asyncio.create_task(asyncio.to_thread(infra.wait_ready, [gateway], timeout=budget))
    )
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _stop_all(data_dir: Path, names: list[str]) -> list[tuple[str, StopResult]]:
    results = []
    for name in reversed(names):
        results.append((name, processes.stop(data_dir, name)))
    return results


def _clean_previous(data_dir: Path, report: Reporter) -> None:
    """Refuse if a complete previous run is alive; otherwise remove what is left of it."""
    names = processes.recorded_names(data_dir)
    previous = state_file.read(data_dir)
    if not names:
        state_file.remove(data_dir)
        return
    alive = {
        name
        for name in names
        if (record := processes.read_record(data_dir, name)) is not None
        and processes.is_alive(record)
    }
    if previous is not None and {c.name for c in previous.components} <= alive:
        raise AlreadyRunning(data_dir, previous)
    for name, result in _down_locked(data_dir):
        report(f"previous run: {name} {result.value}, cleaned up")


def up(
    data_dir: Path,
    *,
    base_port: int | None = None,
    topology: Topology | None = None,
    project: Path | None = None,
    log_level: str = "info",
    timeout: float = 60.0,
    nats_cluster: int = 0,
    report: Reporter = lambda _msg: None,
) -> MeshState:
    """Start the whole mesh in ``data_dir`` and return what runs where.

    ``nats_cluster``: run NATS as a JetStream cluster of that many nodes (3 to 5) instead
    of one server; the services then get every node's URL and create every stream and
    bucket with 3 replicas.

    Raises:
        AlreadyRunning: every component of the previous run in ``data_dir`` is alive.
        PortInUse: a port (fixed by ``base_port``, or chosen) is taken.
        ComponentFailed: something did not become healthy; all started ones are stopped.
    """
    if nats_cluster and not cluster.MIN_NODES <= nats_cluster <= cluster.MAX_NODES:
        raise MeshError(
            f"--nats-cluster takes {cluster.MIN_NODES} to {cluster.MAX_NODES} nodes, "
            f"not {nats_cluster}"
        )
    data_dir = data_dir.resolve()
    project = (project or project_root()).resolve()
    topology = topology or load_topology(project / "deploy/local/topology.yaml")
    # External A2A agents (TESSERA_A2A_AGENTS_FILE, inherited by every process): their
    # tools get Vault scopes and the bridge agent that serves their capabilities runs.
    try:
        declared = a2a_agents.load(a2a_agents.A2AAgentsSettings().a2a_agents_file)
    except a2a_agents.DeclarationError as exc:
        raise MeshError(str(exc)) from None
    if declared and all(s.name != A2A_BRIDGE.name for s in topology.services):
        topology = Topology(services=(*topology.services, A2A_BRIDGE))
    with _locked(data_dir):
        _clean_previous(data_dir, report)
        ports = plan_ports(topology, base_port=base_port, nats_cluster=nats_cluster)
        started: list[str] = []
        try:
            return _start(
                data_dir,
                project,
                topology,
                ports,
                log_level,
                timeout,
                started,
                report,
                nats_cluster=nats_cluster,
                extra_tools=tuple(agent.tool for agent in declared),
            )
        except infra.StartFailed as exc:
            tail = processes.tail(exc.log_path)
            _stop_all(data_dir, started)
            state_file.remove(data_dir)
            raise ComponentFailed(exc.name, exc.reason, exc.log_path, tail) from None
        except BaseException:
            _stop_all(data_dir, started)
            state_file.remove(data_dir)
            raise


def envoy_cert_dir(data_dir: Path) -> Path:
    """Envoy's certificate files for its ADS connection (written by the control plane)."""
    return data_dir / "secrets" / "envoy"


def _control_plane_env(data_dir: Path, project: Path, ports: Mapping[str, int]) -> dict[str, str]:
    """What the gateway control plane needs to configure the Envoy `up` starts."""
    descriptors = data_dir / "gateway" / "tessera.binpb"
    try:
        build_descriptor_set(project, descriptors)
    except DescriptorBuildFailed as exc:
        error_log = processes.logs_dir(data_dir) / "buf.log"
        error_log.parent.mkdir(parents=True, exist_ok=True)
        error_log.write_text(f"{exc}\n")
        raise infra.StartFailed("gateway descriptors", "buf build failed", str(error_log)) from exc
    return {
        "TESSERA_GATEWAY_ENVOY_LISTEN": f"{LOOPBACK}:{ports['gateway']}",
        "TESSERA_GATEWAY_CERT_DIR": str(envoy_cert_dir(data_dir)),
        # The planner and the agents take calls from mesh identities alone; of the tool
        # proxy, people reach its MCP face only (McpService: MCP_PUBLIC_METHODS).
        "TESSERA_PLANNER_ADDRESS": "",
        "TESSERA_GATEWAY_ACCESS_LOG": str(processes.logs_dir(data_dir) / "envoy-access.log"),
        "TESSERA_GATEWAY_DESCRIPTOR_SET": str(descriptors),
        "TESSERA_GATEWAY_ROUTES_FILE": str(project / "gateway" / "routes.yaml"),
    }


def _start(
    data_dir: Path,
    project: Path,
    topology: Topology,
    ports: dict[str, int],
    log_level: str,
    timeout: float,
    started: list[str],
    report: Reporter,
    *,
    nats_cluster: int = 0,
    extra_tools: tuple[str, ...] = (),
) -> MeshState:
    t0 = time.monotonic()
    replicas = cluster.replicas_for(nats_cluster) if nats_cluster else 1
    control_plane = next((s for s in topology.services if s.module == CONTROL_PLANE_MODULE), None)

    def left() -> float:
        return max(1.0, timeout - (time.monotonic() - t0))

    def vault() -> tuple[infra.OpenBaoServer, dict[str, Path] | None]:
        started.append("openbao")  # before the spawn: a failed start is still stopped
        bao = openbao.start_persistent_openbao(data_dir, port=ports["openbao"], timeout=left())
        infra.wait_ready([bao], timeout=left())
        return bao, _bootstrap_vault(bao, project, data_dir, report, extra_tools=extra_tools)

    def gateway() -> dict[str, str]:
        return {} if control_plane is None else _control_plane_env(data_dir, project, ports)

    # OpenBao first (NATS needs its certificate and every identity's user), the gateway's
    # descriptor set meanwhile; then NATS with TLS, and the streams declared as operator.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        bootstrapped = pool.submit(vault)
        described = pool.submit(gateway)
        steps: list[concurrent.futures.Future[Any]] = [bootstrapped, described]
        concurrent.futures.wait(steps, return_when=concurrent.futures.FIRST_EXCEPTION)
        for step in steps:  # the first failure, in this order
            if step.done() and (error := step.exception()) is not None:
                raise error
        bao, approles = bootstrapped.result()
        gateway_env = described.result()
    security = None
    if approles:
        security = nats_security.issue_server_certificate(
            data_dir, bao.addr, approles, CommonSettings().namespace
        )
    nats_nodes = _start_nats(data_dir, ports, nats_cluster, started, security)
    nats_url = ",".join(node.url for node in nats_nodes)
    infra.wait_ready(nats_nodes, timeout=left())
    if nats_cluster:
        # Replicated streams can only be created once the cluster has a meta leader.
        cluster.wait_cluster_ready(nats_nodes, timeout=left())
    operator = probe_identity(data_dir, [Component("openbao", "infra", bao.addr, bao.pid, "", ())])
    _declare_jetstream(
        nats_url,
        replicas,
        within_s=left(),
        log_path=nats_nodes[0].log_path,
        operator=operator if security is not None else None,
    )
    log.info("infra_ready", seconds=round(time.monotonic() - t0, 2))

    services: list[Component] = []
    components: list[Component] = [
        Component(n.name, "infra", n.url, n.pid, n.log_path, (), n.health_url) for n in nats_nodes
    ]
    components.append(
        Component("openbao", "infra", bao.addr, bao.pid, bao.log_path, (), bao.health_url)
    )
    for spec in topology.services:
        env = _service_env(
            spec,
            topology,
            ports,
            nats_url=nats_url,
            jetstream_replicas=replicas,
            vault_addr=bao.addr,
            approles=approles or {},
            log_level=log_level,
            nats_tls=security is not None,
        )
        if spec is control_plane:
            env.update(gateway_env)
            if approles:  # people log in at the local OpenBao (vault/humans.yaml)
                env["TESSERA_GATEWAY_JWT_ISSUER"] = issuer_of(bao.addr)
        argv = [sys.executable, "-m", spec.module]
        record = processes.spawn(data_dir, spec.name, argv, env=env, cwd=project)
        started.append(spec.name)
        address = f"{LOOPBACK}:{ports[spec.name]}"
        services.append(
            Component(spec.name, "service", address, record.pid, record.log_path, spec.health)
        )
    components.extend(services)

    upstreams = [
        Upstream(spec.name, f"{LOOPBACK}:{ports[spec.name]}", spec.health, spec.public_methods)
        for spec in topology.services
        if spec.public or spec.public_methods
    ]
    health_upstream = next(
        (s.name for s in topology.services if s.name == "coordinator"),
        upstreams[0].name if upstreams else None,
    )
    operator = probe_identity(data_dir, components) if approles else None
    xds_tls = None
    if control_plane is not None and operator is not None:
        # Envoy's ADS connection needs the certificate the control plane writes at start.
        plane = next(c for c in services if c.name == control_plane.name)

        async def plane_serving() -> None:
            await wait_service(plane, asyncio.get_running_loop().time() + left(), operator)

        asyncio.run(plane_serving())
        xds_tls = XdsTls(envoy_cert_dir(data_dir), operator.trust_domain, control_plane.name)
    envoy = infra.start_envoy(
        data_dir,
        port=ports["gateway"],
        admin_port=ports["gateway-admin"],
        gateway_dir=project / "gateway",
        upstreams=upstreams,
        health_upstream=health_upstream,
        xds_address=None if control_plane is None else f"{LOOPBACK}:{ports[control_plane.name]}",
        xds_tls=xds_tls,
        name="envoy",
        wait=False,
    )
    started.append(envoy.name)
    components.append(
        Component(
            "envoy", "gateway", envoy.address, envoy.pid, envoy.log_path, (), envoy.health_url
        )
    )
    remaining = max(1.0, timeout - (time.monotonic() - t0))
    asyncio.run(_wait_all(services, envoy, remaining, operator))

    mesh = MeshState(
        data_dir=str(data_dir),
        started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        gateway=envoy.address,
        ports=ports,
        components=tuple(components),
        vault_bootstrapped=approles is not None,
    )
    state_file.write(data_dir, mesh)
    log.info("mesh_up", seconds=round(time.monotonic() - t0, 2), gateway=envoy.address)
    return mesh


def _declare_jetstream(
    nats_url: str,
    replicas: int,
    *,
    within_s: float,
    log_path: str,
    operator: OperatorIdentity | None = None,
) -> None:
    """Create the streams and buckets before any service starts. Every service declares
    them again (a no-op then); without this, a dozen processes would race to create them
    while a fresh cluster is still electing their leaders."""
    from tessera.runtime import bus  # only `up` needs NATS
    from tessera.runtime.config import CommonSettings

    namespace = CommonSettings().namespace  # what the services will read (TESSERA_NAMESPACE)

    async def declare() -> None:
        nc = await bus.connect(
            nats_url,
            name="tessera-up",
            initial_timeout_s=within_s,
            **(operator.nats_options() if operator is not None else {}),
        )
        try:
            topology = bus.Topology(namespace)
            await bus.declare(nc.jetstream(), topology, replicas=replicas, within_s=within_s)
        finally:
            await bus.close(nc)

    try:
        asyncio.run(declare())
    except Exception as exc:  # one clear line, like any other component that failed
        raise infra.StartFailed(
            "jetstream", f"streams not declared: {type(exc).__name__}: {exc}", log_path
        ) from exc


def _start_nats(
    data_dir: Path,
    ports: Mapping[str, int],
    nats_cluster: int,
    started: list[str],
    security: infra.NatsSecurity | None = None,
) -> list[infra.NatsServer]:
    """Spawn the one server (``nats``) or the cluster's nodes, without waiting."""
    if not nats_cluster:
        nats = infra.start_nats(
            data_dir,
            port=ports["nats"],
            monitor_port=ports["nats-monitor"],
            security=security,
            wait=False,
        )
        started.append(nats.name)
        return [nats]
    layout = [
        cluster.NodePorts(
            client=ports[cluster.node_name(i)],
            monitor=ports[cluster.node_name(i) + "-monitor"],
            route=ports[cluster.node_name(i) + "-cluster"],
        )
        for i in range(nats_cluster)
    ]
    nodes = []
    for index in range(nats_cluster):
        node = cluster.start_node(data_dir, layout, index, wait=False, security=security)
        started.append(node.name)
        nodes.append(node)
    return nodes


def _down_locked(data_dir: Path) -> list[tuple[str, StopResult]]:
    recorded = state_file.read(data_dir)
    order = [c.name for c in recorded.components] if recorded else []
    extra = [n for n in processes.recorded_names(data_dir) if n not in order]
    # Reverse start order for what state.json names; anything else (a crashed `up`) first.
    results = _stop_all(data_dir, order) if recorded else []
    results = _stop_all(data_dir, extra) + results
    state_file.remove(data_dir)
    return [(name, result) for name, result in results if result is not StopResult.NOT_RUNNING]


def down(data_dir: Path) -> list[tuple[str, StopResult]]:
    """Stop every process the PID files in ``data_dir`` name, in reverse start order.

    Idempotent: returns an empty list when nothing was running.
    """
    data_dir = data_dir.resolve()
    if not data_dir.is_dir():
        return []
    with _locked(data_dir):
        return _down_locked(data_dir)


async def _service_health(component: Component, operator: OperatorIdentity | None) -> Health:
    return await _health(component, 1.0, operator)


def status(data_dir: Path) -> list[ComponentStatus] | None:
    """Health of each recorded component, or None if no mesh was started in ``data_dir``."""
    data_dir = data_dir.resolve()
    recorded = state_file.read(data_dir)
    if recorded is None:
        return None

    try:
        operator = probe_identity(data_dir, recorded.components)
    except Exception:  # OpenBao down: services then show as not serving, not a crash
        operator = None

    async def check(component: Component) -> Health:
        record = processes.read_record(data_dir, component.name)
        if record is None or not processes.is_alive(record):
            return Health.DOWN
        if component.kind == "service":
            health = await _service_health(component, operator)
            return Health.NOT_SERVING if health is Health.DOWN else health
        url = component.health_url
        ok = url is not None and await asyncio.to_thread(http_ok, url)
        return Health.SERVING if ok else Health.NOT_SERVING

    async def check_all() -> list[Health]:
        return list(await asyncio.gather(*(check(c) for c in recorded.components)))

    healths = asyncio.run(check_all())
    return [
        ComponentStatus(c.name, c.kind, c.address, c.pid, h)
        for c, h in zip(recorded.components, healths, strict=True)
    ]
