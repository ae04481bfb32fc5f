"""Checks an agent's answer against the capability contract it promised (supervisor check)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from tessera.v1 import agent_pb2, common_pb2

STRUCT_TYPE = "google.protobuf.Struct"
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


def schema_problems(value: Any, schema: dict[str, Any], path: str = "output") -> list[str]:
    """A small JSON Schema subset (type, required, properties, enum, minimum, maximum,
    items): enough for agent output contracts without another dependency."""
    problems: list[str] = []
    expected = schema.get("type")
    if isinstance(expected, str) and expected in _JSON_TYPES:
        ok = isinstance(value, _JSON_TYPES[expected]) and not (
            expected in ("number", "integer") and isinstance(value, bool)
        )
        if expected == "integer" and isinstance(value, float) and value.is_integer():
            ok = True
        if not ok:
            return [f"{path}: expected {expected}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: below minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: above maximum {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}.{key}: required")
        for key, sub in schema.get("properties", {}).items():
            if key in value and isinstance(sub, dict):
                problems.extend(schema_problems(value[key], sub, f"{path}.{key}"))
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems.extend(schema_problems(item, schema["items"], f"{path}[{index}]"))
    return problems


def output_as_dict(payload: common_pb2.Payload) -> dict[str, Any]:
    if payload.HasField("json"):
        return json_format.MessageToDict(payload.json)
    if payload.HasField("typed"):
        return {"@type": payload.typed.type_url}
    return {}


def contract_problems(
    contract: common_pb2.CapabilityContract, response: agent_pb2.ExecuteTaskResponse
) -> list[str]:
    """Everything about `response` that breaks `contract`; empty when it conforms."""
    problems: list[str] = []
    output_type = contract.output_type or STRUCT_TYPE
    payload = response.output
    if output_type == STRUCT_TYPE:
        if payload.HasField("typed"):
            problems.append(f"output: expected JSON ({STRUCT_TYPE}), got a typed message")
        elif contract.HasField("output_schema"):
            schema = json_format.MessageToDict(contract.output_schema)
            problems.extend(schema_problems(output_as_dict(payload), schema))
    elif not payload.HasField("typed") or not payload.typed.type_url.endswith("/" + output_type):
        problems.append(f"output: expected a {output_type} message")
    undeclared = sorted(set(response.blackboard_writes) - set(contract.writes))
    if undeclared:
        problems.append(f"blackboard_writes: keys not declared in the contract: {undeclared}")
    if response.HasField("handoff") and response.handoff.capability not in contract.handoffs:
        problems.append(
            f"handoff: {response.handoff.capability!r} is not among the contract's handoffs"
        )
    if response.has_confidence and not 0.0 <= response.confidence <= 1.0:
        problems.append("confidence: must be within [0, 1]")
    return problems
