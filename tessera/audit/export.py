"""``tessera audit export``: the audit stream and every public key version in one file,
so that chains and signatures verify later with no NATS and no Vault.

Format (JSON Lines, UTF-8): a header line, then one line per stored message in stream
order::

    {"format": "tessera.audit.export/v1", "namespace": ..., "stream": ...,
     "exported_at": "<RFC 3339>", "last_stream_sequence": N, "entries": M,
     "public_keys": {"audit-policy": {"algorithm": "ed25519",
                                     "versions": {"1": "<base64>", ...}}, ...}}
    {"stream_sequence": 1, "writer": "policy-1a2b", "data": "<base64 of the stored bytes>"}

The stored bytes are kept as they are, so hashes are checked over exactly what was
stored. The public keys in a file prove only what the file itself says: compare them
with Vault's (``tessera audit keys``, or pin them with ``--keys``) when the file came
from somewhere you do not trust.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tessera.audit.reader import AuditEntry, parse_record
from tessera.audit.signing import PublicKeys

__all__ = ["EXPORT_FORMAT", "Export", "load_export", "write_export"]

EXPORT_FORMAT = "tessera.audit.export/v1"


@dataclass(frozen=True)
class Export:
    """An export read back."""

    namespace: str
    stream: str
    exported_at: str
    last_stream_sequence: int
    keys: PublicKeys
    entries: tuple[AuditEntry, ...]


def write_export(
    path: Path,
    stored: Iterable[AuditEntry],
    *,
    namespace: str,
    stream: str,
    last_stream_sequence: int,
    keys: PublicKeys,
) -> int:
    """Write an export atomically (a temporary file renamed into place); the number of
    entries written."""
    materialized = list(stored)
    header: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "namespace": namespace,
        "stream": stream,
        "exported_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "last_stream_sequence": last_stream_sequence,
        "entries": len(materialized),
        "public_keys": keys.to_json(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(header, sort_keys=True) + "\n")
        for entry in materialized:
            line = {
                "stream_sequence": entry.stream_sequence,
                "writer": entry.writer,
                "data": base64.b64encode(entry.data).decode(),
            }
            handle.write(json.dumps(line, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return len(materialized)


def load_export(path: Path) -> Export:
    """Read an export. Raises ValueError (naming the line) when it is not one."""
    with path.open(encoding="utf-8") as handle:
        try:
            header = json.loads(handle.readline())
        except ValueError as exc:
            raise ValueError(f"{path}: line 1 is not JSON") from exc
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path}: not a {EXPORT_FORMAT} file")
        keys = PublicKeys.from_json(header.get("public_keys") or {})
        entries: list[AuditEntry] = []
        for number, raw in enumerate(handle, start=2):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                data = base64.b64decode(line["data"], validate=True)
                entry = AuditEntry(
                    int(line["stream_sequence"]), str(line["writer"]), parse_record(data), data=data
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: line {number} is not an export entry") from exc
            entries.append(entry)
    return Export(
        namespace=str(header.get("namespace", "")),
        stream=str(header.get("stream", "")),
        exported_at=str(header.get("exported_at", "")),
        last_stream_sequence=int(header.get("last_stream_sequence", 0)),
        keys=keys,
        entries=tuple(entries),
    )
