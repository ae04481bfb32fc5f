"""Where the CLI finds the mesh: explicit environment first, then what `tessera up`
recorded in the data directory's state.json, then the defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tessera.launcher import mesh as launcher
from tessera.launcher import state as mesh_state
from tessera.launcher.operator import operator_identity


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


def service_channel(address: str, identity: str, data_dir: Path | None = None) -> Any:
    """A channel to the mesh's service ``identity`` at ``address``: mTLS as the operator
    when `tessera up` recorded a mesh (its services refuse plaintext), else plaintext."""
    import grpc

    from tessera.runtime.grpc_client import channel

    directory = data_dir or launcher.default_data_dir()
    recorded = mesh_state.read(directory)
    vault = None
    if recorded is not None:
        vault = next((c for c in recorded.components if c.name == "openbao"), None)
    operator = None if vault is None else operator_identity(directory, vault.address)
    if operator is None:
        return channel(address, service="tessera-cli", max_attempts=1)
    return grpc.aio.secure_channel(
        address, operator.credentials(), options=operator.options_for(identity)
    )


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
