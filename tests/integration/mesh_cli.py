"""A mesh brought up by the real command line (`tessera up --data-dir <tmp>`), as a user
runs it, for the modules that drive it from outside (other languages, A2A clients)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tessera.launcher.topology import project_root

PROJECT_ROOT = project_root(Path(__file__).parent)
CLI_TIMEOUT_S = 120


def tessera(
    *args: str, data_dir: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `tessera` command line (``env``: settings on top of this process's)."""
    full = {**os.environ, "COLUMNS": "200", **(env or {})}
    full.pop("TESSERA_DATA_DIR", None)
    cli = Path(sys.executable).parent / "tessera"
    return subprocess.run(
        [str(cli), *args, "--data-dir", str(data_dir)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        env=full,
    )


@contextmanager
def mesh_up(data_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[Path]:
    """`tessera up` in ``data_dir`` for the block, `tessera down` after it."""
    try:
        up = tessera("up", data_dir=data_dir, env=env)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-4000:]
        yield data_dir
    finally:
        tessera("down", data_dir=data_dir, env=env)


def gateway_address(data_dir: Path) -> str:
    """The front door's ``host:port``, from the mesh's state.json."""
    return str(json.loads((data_dir / "state.json").read_text())["gateway"])
