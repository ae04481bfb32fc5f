"""``<data_dir>/state.json``: what the last `tessera up` started, and where."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Component:
    """One started process as recorded in state.json."""

    name: str
    kind: str  # "infra" | "service" | "gateway"
    address: str
    pid: int
    log_path: str
    health: tuple[str, ...] = ()  # grpc.health.v1 names (services)
    health_url: str | None = None  # HTTP readiness URL (infra, gateway)


@dataclass(frozen=True)
class MeshState:
    """The running mesh, in start order."""

    data_dir: str
    started_at: str
    gateway: str
    ports: dict[str, int] = field(default_factory=dict)
    components: tuple[Component, ...] = ()
    vault_bootstrapped: bool = False


def path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def write(data_dir: Path, state: MeshState) -> None:
    """Write atomically (readers never see half a file)."""
    target = path(data_dir)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, target)


def read(data_dir: Path) -> MeshState | None:
    """The recorded state, or None if absent or unreadable."""
    try:
        raw: dict[str, Any] = json.loads(path(data_dir).read_text())
        components = tuple(
            Component(
                name=str(c["name"]),
                kind=str(c["kind"]),
                address=str(c["address"]),
                pid=int(c["pid"]),
                log_path=str(c["log_path"]),
                health=tuple(c.get("health", ())),
                health_url=c.get("health_url"),
            )
            for c in raw["components"]
        )
        return MeshState(
            data_dir=str(raw["data_dir"]),
            started_at=str(raw["started_at"]),
            gateway=str(raw["gateway"]),
            ports={str(k): int(v) for k, v in raw.get("ports", {}).items()},
            components=components,
            vault_bootstrapped=bool(raw.get("vault_bootstrapped", False)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(data_dir: Path) -> None:
    path(data_dir).unlink(missing_ok=True)
