"""Where the CLI finds the mesh: explicit environment first, then what `tessera up`
recorded in the data directory's state.json, then the defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tessera.launcher import mesh as launcher
from tessera.launcher import state as mesh_state
from tessera.launcher.operator import OperatorIdentity, operator_identity


def nats_url(default: str, data_dir: Path | None = None) -> str:
    """``data_dir``: the mesh a command's ``--data-dir`` names (else $TESSERA_DATA_DIR)."""
    if "TESSERA_NATS_URL" in os.environ:
        return os.environ["TESSERA_NATS_URL"]
    recorded = mesh_state.read(data_dir or launcher.default_data_dir())
    if recorded is not None:
        # One server ("nats"), or the nodes of `tessera up --nats-cluster N` ("nats-n1"...).
        servers = [
            c.address
            for c in recorded.components
            if c.name == "nats" or c.name.startswith("nats-n")
        ]
        if servers:
            return ",".join(servers)
    return default


def _operator(directory: Path) -> OperatorIdentity | None:
    recorded = mesh_state.read(directory)
    if recorded is None:
        return None
    vault = next((c for c in recorded.components if c.name == "openbao"), None)
    return None if vault is None else operator_identity(directory, vault.address)


def service_channel(address: str, identity: str, data_dir: Path | None = None) -> Any:
    """A channel to the mesh's service ``identity`` at ``address``: mTLS as the operator
    when `tessera up` recorded a mesh (its services refuse plaintext), else plaintext."""
    import grpc

    from tessera.runtime.grpc_client import channel

    operator = _operator(data_dir or launcher.default_data_dir())
    if operator is None:
        return channel(address, service="tessera-cli", max_attempts=1)
    return grpc.aio.secure_channel(
        address, operator.credentials(), options=operator.options_for(identity)
    )


def nats_options(data_dir: Path | None = None) -> dict[str, Any]:
    """TLS keyword arguments for :func:`tessera.runtime.bus.connect` as the operator, when
    the mesh `tessera up` recorded requires them (its NATS maps certificates to users)."""
    directory = data_dir or launcher.default_data_dir()
    if not (directory / "secrets" / "nats").is_dir():
        return {}
    operator = _operator(directory)
    return operator.nats_options() if operator is not None else {}


def service_address(name: str, env: str, default: str) -> str:
    """`name` as in the topology (e.g. "policy"), `env` e.g. TESSERA_POLICY_ADDRESS."""
    if env in os.environ:
        return os.environ[env]
    recorded = mesh_state.read(launcher.default_data_dir())
    if recorded is not None:
        for component in recorded.components:
            if component.name == name:
                return component.address
    return default
