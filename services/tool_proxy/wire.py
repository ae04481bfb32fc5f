"""Requests in, responses out: decoding that never answers INTERNAL, metadata, Structs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

__all__ = ["Malformed", "metadata_value", "safe_deserializer", "to_struct"]


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request whose bytes did not decode (answered INVALID_ARGUMENT)."""

    error: str


def safe_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises (grpcio would answer INTERNAL)."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return Malformed(type(exc).__name__)

    return parse


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out
