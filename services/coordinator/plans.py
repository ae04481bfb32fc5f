"""Explicit plans validated once: a start with the same plan as an earlier one, while the
registry offers the same agents, reuses the planner's answer instead of asking again.

The key is the plan's bytes and the registry's fingerprint (tessera.registry), so an agent
that registers, leaves or changes its contracts makes the next start ask the planner."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from tessera.registry import Registry
from tessera.v1 import planner_pb2

__all__ = ["PlanCache"]

SIZE = 256
"""Distinct validated plans kept (least recently used go)."""


class PlanCache:
    def __init__(self, registry: Registry | None, *, size: int = SIZE) -> None:
        self.registry = registry
        self.size = size
        self._plans: OrderedDict[tuple[bytes, str], bytes] = OrderedDict()

    async def key(self, plan: planner_pb2.TaskGraph) -> tuple[bytes, str] | None:
        """The cache key of ``plan`` now (None: no registry to key on, never cached)."""
        if self.registry is None:
            return None
        wire = plan.SerializeToString(deterministic=True)
        return hashlib.sha256(wire).digest(), await self.registry.fingerprint()

    def get(self, key: tuple[bytes, str] | None) -> planner_pb2.TaskGraph | None:
        if key is None or key not in self._plans:
            return None
        self._plans.move_to_end(key)
        return planner_pb2.TaskGraph.FromString(self._plans[key])

    def put(self, key: tuple[bytes, str] | None, validated: planner_pb2.TaskGraph) -> None:
        if key is None:
            return
        self._plans[key] = validated.SerializeToString()
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)
