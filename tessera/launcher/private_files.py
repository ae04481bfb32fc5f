"""Files only the launcher's user may read: keys, tokens, configs holding a password."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, text: str) -> None:
    """Write ``path`` 0600 (its directory 0700 when created), atomically: a reader (a
    server reloading its certificate, a CLI reading a token) sees the old or the new
    content, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a leftover tmp file
    os.replace(tmp, path)
