"""The record format's small helpers: hashing, names, receipts."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from tessera.v1 import audit_pb2

__all__ = ["kind_name", "receipt_for", "record_hash", "to_struct", "to_timestamp_str"]

_KIND_NAMES = {v.number: v.name for v in audit_pb2.AuditKind.DESCRIPTOR.values}


def record_hash(record: audit_pb2.AuditRecord) -> bytes:
    """SHA-256 over ``record``'s deterministic serialization with ``hash`` empty."""
    unhashed = audit_pb2.AuditRecord()
    unhashed.CopyFrom(record)
    unhashed.ClearField("hash")
    return hashlib.sha256(unhashed.SerializeToString(deterministic=True)).digest()


def kind_name(kind: int) -> str:
    """``AUDIT_KIND_POLICY_DECISION`` → ``policy_decision``."""
    return _KIND_NAMES.get(kind, str(kind)).removeprefix("AUDIT_KIND_").lower()


def to_timestamp_str(ts: timestamp_pb2.Timestamp) -> str:
    """RFC 3339 UTC with millisecond precision, for humans."""
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def receipt_for(writer: str, record: audit_pb2.AuditRecord) -> audit_pb2.AuditReceipt:
    """The receipt of a stored ``record`` of chain ``writer`` (see ``AuditReceipt``)."""
    return audit_pb2.AuditReceipt(
        writer=writer,
        sequence=record.sequence,
        record_hash=record.hash,
        decision_id=record.decision_id,
    )


def to_struct(details: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(details)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit details must be JSON-like: {exc}") from exc
    return struct
