"""Building a ``CapabilityContract`` from the ``@agent.capability(...)`` arguments."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf import duration_pb2

from tessera import semver
from tessera.agent._convert import STRUCT_TYPE, to_struct
from tessera.agent._types import TaskContext, TaskResult
from tessera.v1 import common_pb2

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "ApprovalName",
    "Capability",
    "CostClassName",
    "Handler",
    "SideEffectName",
    "build_contract",
]

DEFAULT_MAX_CONCURRENCY = 32
"""Concurrent executions per capability and replica when the contract leaves it at 0."""

Handler = Callable[[TaskContext], Awaitable[TaskResult]]
SideEffectName = Literal["read_only", "idempotent_write", "external_action"]
ApprovalName = Literal["none", "conditional", "always"]
CostClassName = Literal["free", "low", "medium", "high"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SIDE_EFFECTS: dict[str, common_pb2.SideEffectClass.ValueType] = {
    "read_only": common_pb2.SIDE_EFFECT_CLASS_READ_ONLY,
    "idempotent_write": common_pb2.SIDE_EFFECT_CLASS_IDEMPOTENT_WRITE,
    "external_action": common_pb2.SIDE_EFFECT_CLASS_EXTERNAL_ACTION,
}
_APPROVALS: dict[str, common_pb2.ApprovalRequirement.ValueType] = {
    "none": common_pb2.APPROVAL_REQUIREMENT_NONE,
    "conditional": common_pb2.APPROVAL_REQUIREMENT_CONDITIONAL,
    "always": common_pb2.APPROVAL_REQUIREMENT_ALWAYS,
}
_COSTS: dict[str, common_pb2.CostClass.ValueType] = {
    "free": common_pb2.COST_CLASS_FREE,
    "low": common_pb2.COST_CLASS_LOW,
    "medium": common_pb2.COST_CLASS_MEDIUM,
    "high": common_pb2.COST_CLASS_HIGH,
}


def _choice(kind: str, value: str, table: Mapping[str, int]) -> Any:
    if value not in table:
        raise ValueError(f"{kind} {value!r}: expected one of {', '.join(sorted(table))}")
    return table[value]


def build_contract(
    name: str,
    *,
    version: str,
    side_effect: SideEffectName,
    description: str = "",
    reads: Sequence[str] = (),
    writes: Sequence[str] = (),
    tools: Sequence[str] = (),
    handoffs: Sequence[str] = (),
    compensation: str = "",
    approval: ApprovalName = "none",
    cost_class: CostClassName = "free",
    timeout_s: float = 30.0,
    max_concurrency: int = 0,
    confidence_threshold: float = 0.0,
    input_type: str = STRUCT_TYPE,
    output_type: str = STRUCT_TYPE,
    output_schema: Mapping[str, Any] | None = None,
) -> common_pb2.CapabilityContract:
    """The contract proto; raises ``ValueError`` on anything the coordinator would refuse
    (bad name or version, non-positive timeout, threshold outside [0, 1]…)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"capability name {name!r}: use lower-case dotted '<domain>.<role>'")
    semver.parse(version)
    for target in handoffs:
        if not _NAME_RE.match(target):
            raise ValueError(f"handoff target {target!r} of {name!r} is not a capability name")
    if compensation and not _NAME_RE.match(compensation):
        raise ValueError(f"compensation {compensation!r} of {name!r} is not a capability name")
    if compensation == name:
        raise ValueError(f"capability {name!r} cannot be its own compensation")
    if timeout_s <= 0:
        raise ValueError(f"capability {name!r}: timeout_s must be > 0, got {timeout_s!r}")
    if max_concurrency < 0:
        raise ValueError(f"capability {name!r}: max_concurrency must be >= 0")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"capability {name!r}: confidence_threshold must be in [0, 1]")
    if output_schema is not None and output_type != STRUCT_TYPE:
        raise ValueError(f"capability {name!r}: output_schema needs output_type {STRUCT_TYPE}")
    for label, keys in (("reads", reads), ("writes", writes), ("tools", tools)):
        if isinstance(keys, str):
            raise ValueError(f"capability {name!r}: {label} must be a list, not a string")
        if len(set(keys)) != len(keys):
            raise ValueError(f"capability {name!r}: duplicate entries in {label}")
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(round(timeout_s * 1e9))
    contract = common_pb2.CapabilityContract(
        name=name,
        version=version,
        description=description,
        input_type=input_type,
        output_type=output_type,
        reads=list(reads),
        writes=list(writes),
        tools=list(tools),
        side_effect_class=_choice("side_effect", side_effect, _SIDE_EFFECTS),
        approval=_choice("approval", approval, _APPROVALS),
        cost_class=_choice("cost_class", cost_class, _COSTS),
        timeout=timeout,
        max_concurrency=max_concurrency or DEFAULT_MAX_CONCURRENCY,
        confidence_threshold=confidence_threshold,
        handoffs=list(handoffs),
        compensation=compensation,
    )
    if output_schema is not None:
        contract.output_schema.CopyFrom(to_struct(output_schema))
    return contract


@dataclass(frozen=True)
class Capability:
    """One capability an agent offers: its contract and its handler."""

    contract: common_pb2.CapabilityContract
    handler: Handler

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def timeout_s(self) -> float:
        return self.contract.timeout.ToNanoseconds() / 1e9
