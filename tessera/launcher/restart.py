"""`tessera restart`: stop one component of the local mesh (or kill it, as a crash
would) and start it again with the same command, then wait until it serves.

Operators use it to pick up a changed setting or binary for one process; the chaos suite
uses it to restart what it killed exactly as an operator would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from tessera.launcher import openbao, processes
from tessera.launcher import state as state_file
from tessera.launcher.health import http_ok
from tessera.launcher.infra import OpenBaoServer, StartFailed
from tessera.launcher.mesh import probe_identity, wait_service
from tessera.launcher.operator import OperatorIdentity

__all__ = ["NotRestartable", "Restarted", "restart"]

# `tessera up` runs OpenBao on file storage; it starts sealed, and the launcher holds the
# local mesh's unseal key (see tessera.launcher.openbao).
_SEALED_AT_START = frozenset({"openbao"})


class NotRestartable(RuntimeError):
    """The component is unknown or cannot be restarted on its own."""


@dataclass(frozen=True)
class Restarted:
    name: str
    pid: int
    stopped: str
    """How the old process ended: killed, stopped, or not running."""
    seconds_to_ready: float
    """From the new process's start until it served (health SERVING or HTTP ready)."""


def restart(data_dir: Path, name: str, *, kill: bool = False, timeout: float = 60.0) -> Restarted:
    data_dir = data_dir.resolve()
    recorded = state_file.read(data_dir)
    if recorded is None:
        raise NotRestartable(f"no mesh is running in {data_dir}")
    component = next((c for c in recorded.components if c.name == name), None)
    if component is None:
        known = ", ".join(c.name for c in recorded.components)
        raise NotRestartable(f"no component {name!r} in this mesh (components: {known})")
    previous = processes.read_record(data_dir, name)
    if previous is None:
        raise NotRestartable(f"{name} has no PID file in {processes.run_dir(data_dir)}")
    # The probe's certificate first: whatever is restarted, Vault is not needed mid-restart.
    operator = (
        probe_identity(data_dir, recorded.components) if component.kind == "service" else None
    )
    if kill:
        stopped = "killed" if processes.kill(data_dir, name) is not None else "not running"
    else:
        stopped = processes.stop(data_dir, name).value
    record = processes.respawn(data_dir, previous)
    started = time.monotonic()
    if name in _SEALED_AT_START:
        _unseal(data_dir, component, record.pid, timeout)
    _wait_ready(component, record.pid, timeout, operator)
    ready = time.monotonic() - started
    replaced = tuple(
        dataclasses.replace(c, pid=record.pid) if c.name == name else c for c in recorded.components
    )
    state_file.write(data_dir, dataclasses.replace(recorded, components=replaced))
    return Restarted(name, record.pid, stopped, ready)


def _unseal(data_dir: Path, component: state_file.Component, pid: int, timeout: float) -> None:
    server = OpenBaoServer(
        name=component.name,
        addr=component.address,
        pid=pid,
        log_path=component.log_path,
        root_token_file="",
        root_token="",
    )
    try:
        openbao.unseal(server, data_dir / "secrets", timeout=timeout)
    except StartFailed as exc:
        raise NotRestartable(str(exc)) from None


def _wait_ready(
    component: state_file.Component,
    pid: int,
    timeout: float,
    operator: OperatorIdentity | None = None,
) -> None:
    """Until the new process serves: grpc.health.v1 for services (the poll `up` uses),
    the HTTP readiness URL for the rest."""
    component = dataclasses.replace(component, pid=pid)
    if component.kind == "service":

        async def serving() -> None:
            await wait_service(component, asyncio.get_running_loop().time() + timeout, operator)

        try:
            asyncio.run(serving())
        except StartFailed as exc:
            raise NotRestartable(str(exc)) from None
        return
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not (component.health_url is not None and http_ok(component.health_url)):
        if not processes.pid_exists(pid):
            raise NotRestartable(
                f"{component.name} exited during its start (log: {component.log_path})"
            )
        if time.monotonic() >= deadline:
            raise NotRestartable(
                f"{component.name} did not become ready within {timeout:g}s "
                f"(log: {component.log_path})"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
