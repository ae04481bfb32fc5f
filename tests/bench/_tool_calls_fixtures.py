"""Fixtures of the governed-call benchmark: an OpenBao of its own whose tool list has the
no-op benchmark tool, and the services' AppRole credentials."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tessera.vault.bootstrap import apply
from tests.bench._tool_calls_run import NOOP_TOOL, REPO
from tests.conftest import OpenBao, private_openbao


@pytest.fixture(scope="module")
def tool_calls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with private_openbao(tmp_path_factory.mktemp("bench-bao")) as server:
        yield server


@pytest.fixture(scope="module")
def tool_calls_creds(
    tool_calls_bao: OpenBao, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """vault/ as shipped plus ``bench.noop``, applied; AppRole files by identity."""
    base = tmp_path_factory.mktemp("bench-vault")
    vault_dir = base / "vault"
    shutil.copytree(REPO / "vault", vault_dir)
    tools_file = vault_dir / "tools.yaml"
    spec = yaml.safe_load(tools_file.read_text())
    spec["tools"].append({"name": NOOP_TOOL})
    tools_file.write_text(yaml.safe_dump(spec))
    return apply(tool_calls_bao.addr, tool_calls_bao.root_token, vault_dir, base / "approle")
