"""Files only their owner may read: keys, tokens, AppRole credentials, passwords."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, text: str) -> None:
    """Write ``path`` 0600 (its directory 0700 when created), atomically and durably: a
    reader (a server reloading its certificate, a CLI reading a token) sees the old or
    the new content, never half of one, and no one else can read it at any moment."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A unique name: two writers of one file never share (or truncate) a tmp file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask did to O_CREAT's mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
