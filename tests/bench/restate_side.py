"""The benchmark's Restate side: restate-server (npm's pinned binary, `make restate-server`)
and the workflow's service process (`restate_service.py`), both on loopback only.

    async with RestateSide(tmp_dir) as side:
        report = await restate_run(side, 32, warmup=2, duration=10)

Nothing leaves the machine: every listener (ingress, admin, node-to-node) is bound to
127.0.0.1, the Unix sockets are off (TCP only), the server's usage telemetry is off
(`disable-telemetry`), and its start-up release check (a GET to api.github.com that no
setting turns off) resolves to 127.0.0.1 through an /etc/hosts bind-mounted in a private
mount namespace, where that is allowed (root); `release_check_blocked` says whether it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from tessera.launcher.ports import LOOPBACK, free_port
from tests.bench import harness
from tests.bench.restate_service import WORKFLOW

REPO = harness.REPO
SERVER_BIN = (
    REPO / ".build/restate/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server"
)
# Names the server resolves to loopback: the release check and the telemetry gateway
# (off anyway), so neither can reach the network whatever the settings do.
BLOCKED_HOSTS = ("api.github.com", "restate.gateway.scarf.sh")
READY_BUDGET_S = 60.0
STOP_BUDGET_S = 10.0


def _config(base: Path, *, ingress: int, admin: int, node: int) -> str:
    """The server's restate.toml: defaults kept except where it listens and reports."""
    return f"""\
node-name = "bench"
base-dir = "{base}"
listen-mode = "tcp"
disable-telemetry = true
log-disable-ansi-codes = true
bind-address = "{LOOPBACK}:{node}"
advertised-address = "http://{LOOPBACK}:{node}/"

[ingress]
bind-address = "{LOOPBACK}:{ingress}"
advertised-ingress-endpoint = "http://{LOOPBACK}:{ingress}/"

[admin]
bind-address = "{LOOPBACK}:{admin}"
advertised-admin-endpoint = "http://{LOOPBACK}:{admin}/"
disable-web-ui = true
"""


def _hosts_file(directory: Path) -> Path:
    hosts = directory / "hosts"
    current = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
    hosts.write_text(current + "".join(f"\n{LOOPBACK} {h}" for h in BLOCKED_HOSTS) + "\n")
    return hosts


def _can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _poll(check: Any, what: str, deadline: float) -> None:
    """Call the blocking ``check`` every 20 ms until it is true (connection errors count as
    not yet)."""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if await asyncio.to_thread(check):
                return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {READY_BUDGET_S}s")


async def _stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_BUDGET_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class RestateSide:
    """restate-server plus the service process, the deployment registered; stopped on exit
    (SIGTERM, then SIGKILL after 10 s). Data and logs under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.ingress_url = ""
        self.admin_url = ""
        self.server_pid = 0
        self.service_pid = 0
        self.release_check_blocked = False
        self._server: asyncio.subprocess.Process | None = None
        self._service: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> RestateSide:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await _stop(self._service)
        await _stop(self._server)

    async def start(self) -> None:
        """Start both processes and register the deployment; on any failure, stop what
        was started."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        if not SERVER_BIN.exists():
            raise FileNotFoundError(f"{SERVER_BIN} missing: run `make restate-server`")
        self.directory.mkdir(parents=True, exist_ok=True)
        ports: list[int] = []
        for _ in range(4):
            ports.append(free_port(exclude=ports))
        ingress, admin, node, service = ports
        self.ingress_url = f"http://{LOOPBACK}:{ingress}"
        self.admin_url = f"http://{LOOPBACK}:{admin}"
        config = self.directory / "restate.toml"
        config.write_text(
            _config(self.directory / "restate-data", ingress=ingress, admin=admin, node=node)
        )
        argv = [str(SERVER_BIN), "--config-file", str(config), "--no-logo"]
        self.release_check_blocked = _can_unshare()
        if self.release_check_blocked:
            # A private mount namespace, so the bind mount is the server's alone; `exec`
            # keeps the pid, so the CPU sampled is the server's own.
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"',
                str(_hosts_file(self.directory)),
                *argv,
            ]
        with (self.directory / "restate-server.log").open("wb") as log:
            self._server = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=log, cwd=self.directory
            )
        self.server_pid = self._server.pid
        with (self.directory / "restate-service.log").open("wb") as log:
            self._service = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "tests.bench.restate_service", "--port", str(service)),
                stdout=log,
                stderr=log,
                env=harness.child_env(),
                cwd=REPO,
            )
        self.service_pid = self._service.pid
        deadline = time.monotonic() + READY_BUDGET_S
        await _poll(lambda: _http("GET", f"{self.admin_url}/health")[0] == 200, "admin", deadline)
        await _poll(
            lambda: _http("GET", f"{self.ingress_url}/restate/health")[0] == 200,
            "ingress",
            deadline,
        )
        await _poll(lambda: _connects(service), "service", deadline)
        await self._register(f"http://{LOOPBACK}:{service}", deadline)

    async def _register(self, uri: str, deadline: float) -> None:
        """POST /deployments, then one workflow through the ingress: the ingress learns the
        new service's schema asynchronously, so the first call after registering may 404."""
        status, body = await asyncio.to_thread(
            _http, "POST", f"{self.admin_url}/deployments", f'{{"uri": "{uri}"}}'.encode()
        )
        if status not in (200, 201):
            raise RuntimeError(f"registering {uri}: {status} {body[:500]!r}")
        # A fresh key per attempt: a workflow id runs once.
        await _poll(
            lambda: _http("POST", _run_url(self.ingress_url), b'{"goal": "bench"}')[0] == 200,
            "ingress route",
            deadline,
        )


def _run_url(ingress_url: str) -> str:
    return f"{ingress_url}/{WORKFLOW}/{uuid.uuid4().hex}/run"


def _connects(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1):
        return True


async def restate_run(
    side: RestateSide, concurrency: int, *, warmup: float, duration: float
) -> dict[str, Any]:
    """One closed-loop run through the ingress; the report has the other sides' shape."""
    return await harness.run_driver(
        [
            "-m",
            "tests.bench.restate_driver",
            "--ingress",
            side.ingress_url,
            "--concurrency",
            str(concurrency),
        ],
        env=harness.child_env(),
        warmup=warmup,
        duration=duration,
        watch={"restate-server": side.server_pid, "restate-service": side.service_pid},
    )
