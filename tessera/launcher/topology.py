"""Typed view of ``deploy/local/topology.yaml``: the services `tessera up` starts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TOPOLOGY_PATH = Path("deploy/local/topology.yaml")
_ENV_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")


class TopologyError(ValueError):
    """The topology file is missing or malformed."""


@dataclass(frozen=True)
class ServiceSpec:
    """One service process in the local mesh."""

    name: str
    module: str
    env: str
    identity: str
    health: tuple[str, ...]
    public: bool
    public_methods: tuple[str, ...] = ()
    """Routed by Envoy for these ``package.Service/Method`` only (``public`` routes every
    method of the service)."""


@dataclass(frozen=True)
class Topology:
    """All services, in start order."""

    services: tuple[ServiceSpec, ...]

    def service(self, name: str) -> ServiceSpec:
        for spec in self.services:
            if spec.name == name:
                return spec
        raise KeyError(name)


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding the topology file.

    Falls back to the source checkout this package was imported from.
    """
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / TOPOLOGY_PATH).is_file():
            return candidate
    package_root = Path(__file__).resolve().parents[2]
    if (package_root / TOPOLOGY_PATH).is_file():
        return package_root
    raise TopologyError(f"{TOPOLOGY_PATH} not found above {here}")


def _field(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind):
        raise TopologyError(f"{where}: '{key}' must be a {kind.__name__}")
    return value


def parse(data: Any, *, source: str = "topology") -> Topology:
    """Validate the loaded YAML document."""
    if not isinstance(data, dict) or not isinstance(data.get("services"), list):
        raise TopologyError(f"{source}: expected a mapping with a 'services' list")
    services: list[ServiceSpec] = []
    for index, raw in enumerate(data["services"]):
        where = f"{source}: services[{index}]"
        if not isinstance(raw, dict):
            raise TopologyError(f"{where}: expected a mapping")
        name = _field(raw, "name", str, where)
        env = _field(raw, "env", str, where)
        health = _field(raw, "health", list, where)
        if not _NAME_RE.match(name):
            raise TopologyError(f"{where}: bad name {name!r}")
        if not _ENV_RE.match(env):
            raise TopologyError(f"{where}: bad env {env!r}")
        if not health or not all(isinstance(h, str) for h in health):
            raise TopologyError(f"{where}: 'health' must be a non-empty list of names")
        services.append(
            ServiceSpec(
                name=name,
                module=_field(raw, "module", str, where),
                env=env,
                identity=str(raw.get("identity", name)),
                health=tuple(health),
                public=bool(raw.get("public", False)),
                public_methods=_methods(raw.get("public_methods"), where),
            )
        )
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise TopologyError(f"{source}: duplicate service names")
    return Topology(services=tuple(services))


def load(path: Path | None = None) -> Topology:
    """Load the topology file (default: ``deploy/local/topology.yaml`` under the project)."""
    path = path or project_root() / TOPOLOGY_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: invalid YAML: {exc}") from exc
    return parse(data, source=str(path))


def _methods(raw: object, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(m, str) and m.count("/") == 1 for m in raw):
        raise TopologyError(f"{where}: 'public_methods' must list package.Service/Method names")
    return tuple(raw)
