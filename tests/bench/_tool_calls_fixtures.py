"""Fixtures of the governed-call benchmark: an OpenBao of its own whose tool list has the
no-op benchmark tool and whose identities include the benchmark's agents, and every
identity's AppRole credentials."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tessera.vault.bootstrap import apply
from tests.bench._tool_calls_run import (
    AGENT_IDENTITY,
    NOOP_IDENTITY,
    NOOP_TOOL,
    RELAY_IDENTITY,
    REPO,
)
from tests.conftest import OpenBao, private_openbao


@pytest.fixture(scope="module")
def tool_calls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with private_openbao(tmp_path_factory.mktemp("bench-bao")) as server:
        yield server


@pytest.fixture(scope="module")
def tool_calls_creds(
    tool_calls_bao: OpenBao, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """vault/ as shipped plus ``bench.noop`` and three agents, applied; AppRole files by
    identity.

    The agents (``agent-`` prefix in the identity): ``bench``, the calling client of every
    path, and ``bench-relay`` and ``bench-noop``, the bare chain's two servers. Each gets
    the ordinary agent AppRole, policy and PKI role, so its certificate comes from the same
    mesh CA, with the same key type and lifetime, as the tool proxy's and the policy
    service's."""
    base = tmp_path_factory.mktemp("bench-vault")
    vault_dir = base / "vault"
    shutil.copytree(REPO / "vault", vault_dir)
    tools_file = vault_dir / "tools.yaml"
    spec = yaml.safe_load(tools_file.read_text())
    spec["tools"].append({"name": NOOP_TOOL})
    tools_file.write_text(yaml.safe_dump(spec))
    identities_file = vault_dir / "identities.yaml"
    identities = yaml.safe_load(identities_file.read_text())
    identities["agents"].extend(
        {"name": identity.removeprefix("agent-")}
        for identity in (AGENT_IDENTITY, RELAY_IDENTITY, NOOP_IDENTITY)
    )
    identities_file.write_text(yaml.safe_dump(identities))
    return apply(tool_calls_bao.addr, tool_calls_bao.root_token, vault_dir, base / "approle")
