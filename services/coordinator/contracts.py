"""Checks an agent's answer against the capability contract it promised (supervisor check).

The output schema is checked by ``tessera.jsonschema``, the validator the tool proxy
checks tool arguments with: one meaning of a schema in the whole mesh.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from tessera.jsonschema import Limits, SchemaError, schema_problems
from tessera.v1 import agent_pb2, common_pb2

STRUCT_TYPE = "google.protobuf.Struct"

OUTPUT_LIMITS = Limits(
    max_depth=16,
    max_string_length=64 * 1024,
    max_keys=1024,
    max_items=4096,
    max_evaluations=50_000,
)
"""An answer may be larger than a tool call's arguments (a reply, a list of findings), but
it is checked by the same validator, with the same hostile-input rules, before the
library sees it; only the sizes differ."""


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
            try:
                problems.extend(
                    schema_problems(output_as_dict(payload), schema, limits=OUTPUT_LIMITS)
                )
            except SchemaError as exc:
                # The registry refuses such contracts; one registered before it did (or
                # a cycle only a value reveals) still fails the answer, saying where.
                problems.extend(f"output_schema: {v}" for v in exc.violations)
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
