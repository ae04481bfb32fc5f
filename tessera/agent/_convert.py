"""JSON <-> protobuf conversions for payloads and blackboard values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.message import Message

from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2

STRUCT_TYPE = struct_pb2.Struct.DESCRIPTOR.full_name


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    json_format.ParseDict(dict(data), out)
    return out


def to_value(data: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(data, out)
    return out


def from_value(value: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(value)


def from_struct(value: struct_pb2.Struct) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(value)
    return out


def payload_to_dict(payload: common_pb2.Payload) -> dict[str, Any]:
    """The JSON object of a payload; ``{}`` when unset. A typed payload holding a
    ``google.protobuf.Struct`` is accepted too; other typed payloads are refused here
    (typed agents read ``ctx.payload`` instead)."""
    kind = payload.WhichOneof("kind")
    if kind is None:
        return {}
    if kind == "json":
        return from_struct(payload.json)
    if payload.typed.Is(struct_pb2.Struct.DESCRIPTOR):
        inner = struct_pb2.Struct()
        payload.typed.Unpack(inner)
        return from_struct(inner)
    return {}


def typed_name(payload: common_pb2.Payload) -> str:
    """Fully qualified type name a payload carries (``google.protobuf.Struct`` for JSON)."""
    if payload.WhichOneof("kind") == "typed":
        return payload.typed.type_url.rpartition("/")[2]
    return STRUCT_TYPE


def to_payload(output: Mapping[str, Any] | Message | None) -> common_pb2.Payload | None:
    if output is None:
        return None
    if isinstance(output, Message):
        if isinstance(output, struct_pb2.Struct):
            return common_pb2.Payload(json=output)
        packed = any_pb2.Any()
        packed.Pack(output)
        return common_pb2.Payload(typed=packed)
    try:
        return common_pb2.Payload(json=to_struct(output))
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"output is not a JSON object: {exc}") from exc
