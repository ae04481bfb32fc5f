"""An agent module of this package run as its own process, the way a team deploys one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nats.aio.client import Client

from tessera.launcher.ports import free_port
from tessera.registry import Registry
from tessera.runtime.bus import Topology
from tessera.v1 import agent_pb2

REPO = Path(__file__).resolve().parents[3]


class AgentProcess:
    """``python -m tests.integration.agents.<module>`` on a free loopback port (or on
    ``port``: the same command again, e.g. to restart a killed replica)."""

    def __init__(
        self,
        module: str,
        agent_name: str,
        *,
        nats_url: str,
        namespace: str,
        registry_address: str,
        log_dir: Path,
        replicas: int = 1,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """``extra_env``: settings on top, e.g. the agent's Vault AppRole for a mesh that
        runs mTLS (without one the process inherits the tests' plaintext opt-in)."""
        self.module = module
        self.agent_name = agent_name
        self.namespace = namespace
        self.port = port if port is not None else free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        env_name = agent_name.upper().replace("-", "_")
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TESSERA_NATS_URL": nats_url,
            "TESSERA_NAMESPACE": namespace,
            "TESSERA_REGISTRY_ADDRESS": registry_address,
            "TESSERA_JETSTREAM_REPLICAS": str(replicas),
            f"TESSERA_AGENT_{env_name}_LISTEN": self.endpoint,
            **(extra_env or {}),
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{agent_name}-{self.port}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"tests.integration.agents.{module}"],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.instance_id = ""

    async def registered(
        self, nc: Client, *, within: float = 30.0, replacing: str = ""
    ) -> agent_pb2.AgentDescriptor:
        """Wait until the registry lists this process's endpoint; its descriptor.

        ``replacing``: the instance id of a killed process that had the same endpoint (its
        entry stays until the registry TTL): skipped."""
        registry = Registry(nc.jetstream(), Topology(self.namespace))
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.agent_name} exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text()[-2000:]}"
                )
            for descriptor in await registry.agents():
                if descriptor.endpoint == self.endpoint and descriptor.instance_id != replacing:
                    self.instance_id = descriptor.instance_id
                    return descriptor
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.agent_name} on {self.endpoint} never registered")
            await asyncio.sleep(0.1)

    async def terminate(self, *, within: float = 20.0) -> int:
        """SIGTERM (deregister, drain, exit) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, within)

    def kill(self) -> None:
        """Cleanup: make sure the process is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
