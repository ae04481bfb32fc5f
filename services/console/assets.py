"""The console's files, read once at start and answered from memory.

Only files that exist under the assets folder when the service starts, with a known
type, can be answered: a request names a key of that table, never a path on disk, so
no request can reach another file (``..``, absolute paths, symlinks out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Asset", "Assets"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
MAX_ASSET_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Asset:
    content_type: str
    data: bytes


class Assets:
    def __init__(self, files: dict[str, Asset]) -> None:
        self._files = files

    @classmethod
    def load(cls, root: Path) -> Assets:
        """Every servable file under ``root`` (a missing folder serves nothing)."""
        files: dict[str, Asset] = {}
        if root.is_dir():
            base = root.resolve()
            for path in sorted(base.rglob("*")):
                kind = CONTENT_TYPES.get(path.suffix.lower())
                if kind is None or not path.is_file() or path.is_symlink():
                    continue
                if not path.resolve().is_relative_to(base):
                    continue
                data = path.read_bytes()
                if len(data) <= MAX_ASSET_BYTES:
                    files[path.relative_to(base).as_posix()] = Asset(kind, data)
        return cls(files)

    def get(self, path: str) -> Asset | None:
        """The file at ``path`` (``""`` or a folder's path: its ``index.html``)."""
        key = path.strip("/")
        if not key:
            key = "index.html"
        return self._files.get(key) or self._files.get(f"{key}/index.html")

    def __len__(self) -> int:
        return len(self._files)
