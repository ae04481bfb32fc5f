"""Session fixtures: the real NATS, OpenBao and Envoy from their wheels, on free ports.

Started lazily (only when a test asks) by :mod:`tessera.launcher.infra`, the same code
`tessera up` uses, in one temporary directory, and stopped at the end of the session.

Point the suite at existing servers instead (like the Temporal SDK's conftest):

- ``TESSERA_TEST_NATS_URL=nats://host:4222``
- ``TESSERA_TEST_VAULT_ADDR=http://host:8200`` and ``TESSERA_TEST_VAULT_TOKEN=<token>``
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Services built in-process by the fixtures without an AppRole run plaintext (the explicit
# debugging opt-in); every `tessera up` mesh the tests start runs mTLS with workload
# certificates (the launcher sets TESSERA_INSECURE_PLAINTEXT=0 for what it starts).
os.environ.setdefault("TESSERA_INSECURE_PLAINTEXT", "1")

from tessera.launcher import infra
from tessera.launcher.gateway import Upstream
from tessera.launcher.ports import free_port, is_free
from tessera.launcher.topology import project_root

PROJECT_ROOT = project_root(Path(__file__).parent)
GATEWAY_DIR = PROJECT_ROOT / "gateway"


@dataclass(frozen=True)
class OpenBao:
    """An OpenBao (or Vault) server for tests: its address and a root token."""

    addr: str
    root_token: str = field(repr=False)

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])


@contextlib.contextmanager
def private_openbao(directory: Path) -> Iterator[OpenBao]:
    """An OpenBao of a test module's own, for tests that reconfigure roles or tools."""
    server = infra.start_openbao(directory, port=free_port(pair=True))
    try:
        yield OpenBao(addr=server.addr, root_token=server.root_token)
    finally:
        infra.stop(directory, server.name)


EnvoyFactory = Callable[..., infra.EnvoyServer]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is an integration test."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


MESH_PORT_BLOCK = 200
"""Ports a `tessera up` needs from its --base-port (services, OpenBao pair, NATS cluster)."""


def _ephemeral_floor() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
    except (OSError, IndexError):
        return 32768
    return int(low)


@pytest.fixture(scope="session", autouse=True)
def mesh_base_port() -> Iterator[int]:
    """Every `tessera up` a test runs gets its ports from one free block *below* the
    kernel's ephemeral range (TESSERA_BASE_PORT). Its default ports (50051…) lie inside
    that range, where any outgoing connection of the session may take one between the
    launcher's check and a service's bind."""
    floor = _ephemeral_floor()
    for base in range(20000, floor - MESH_PORT_BLOCK, MESH_PORT_BLOCK):
        if all(is_free(port) for port in range(base, base + MESH_PORT_BLOCK)):
            break
    else:
        pytest.fail("no free block of ports below the ephemeral range for `tessera up`")
    previous = os.environ.get("TESSERA_BASE_PORT")
    os.environ["TESSERA_BASE_PORT"] = str(base)
    try:
        yield base
    finally:
        if previous is None:
            os.environ.pop("TESSERA_BASE_PORT", None)
        else:
            os.environ["TESSERA_BASE_PORT"] = previous


class _Ports:
    """Free loopback ports, never the same one twice in a session."""

    def __init__(self) -> None:
        self._given: set[int] = set()

    def take(self, *, pair: bool = False) -> int:
        port = free_port(exclude=self._given, pair=pair)
        self._given.update({port, port + 1} if pair else {port})
        return port


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data directory of the session's servers (logs under ``logs/``)."""
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def free_ports() -> _Ports:
    return _Ports()


@pytest.fixture(scope="session")
def nats_url(infra_dir: Path, free_ports: _Ports) -> Iterator[str]:
    """URL of a JetStream-enabled nats-server (``sync_interval: always``)."""
    external = os.environ.get("TESSERA_TEST_NATS_URL")
    if external:
        yield external
        return
    server = infra.start_nats(infra_dir, port=free_ports.take(), monitor_port=free_ports.take())
    try:
        yield server.url
    finally:
        infra.stop(infra_dir, server.name)


@pytest.fixture(scope="session")
def openbao(infra_dir: Path, free_ports: _Ports) -> Iterator[OpenBao]:
    """A dev-mode OpenBao with a random root token."""
    addr = os.environ.get("TESSERA_TEST_VAULT_ADDR")
    if addr:
        token = os.environ.get("TESSERA_TEST_VAULT_TOKEN")
        if not token:
            pytest.fail("TESSERA_TEST_VAULT_ADDR is set but TESSERA_TEST_VAULT_TOKEN is not")
        yield OpenBao(addr=addr, root_token=token)
        return
    server = infra.start_openbao(infra_dir, port=free_ports.take(pair=True))
    try:
        yield OpenBao(addr=server.addr, root_token=server.root_token)
    finally:
        infra.stop(infra_dir, server.name)


@pytest.fixture(scope="session")
def envoy_factory(infra_dir: Path, free_ports: _Ports) -> Iterator[EnvoyFactory]:
    """Start an Envoy gateway routing to given upstreams; all are stopped at session end.

    ``envoy_factory([Upstream("coordinator", "127.0.0.1:50051",
    ("tessera.v1.CoordinatorService",))], health_upstream="coordinator")`` returns an
    :class:`~tessera.launcher.infra.EnvoyServer` whose ``address`` is the gRPC listener.
    """
    started: list[str] = []

    def start(
        upstreams: Sequence[Upstream] = (), *, health_upstream: str | None = None
    ) -> infra.EnvoyServer:
        name = f"envoy-{len(started)}"
        started.append(name)
        return infra.start_envoy(
            infra_dir,
            port=free_ports.take(),
            admin_port=free_ports.take(),
            gateway_dir=GATEWAY_DIR,
            upstreams=upstreams,
            health_upstream=health_upstream,
            name=name,
        )

    try:
        yield start
    finally:
        for name in reversed(started):
            infra.stop(infra_dir, name)


@pytest.fixture
def namespace() -> str:
    """A unique lowercase prefix for this test's NATS streams, buckets and subjects."""
    return "t" + secrets.token_hex(4)
