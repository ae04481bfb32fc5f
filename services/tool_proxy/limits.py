"""Token-bucket rate limits per agent and per tool (per replica, in memory).

A bucket holds at most ``burst`` tokens and refills at ``rate`` per second; a call takes
one. A refused call learns how long until the next token (RetryInfo). The limits are per
replica: with R replicas the mesh-wide ceiling is R times the configured one, which is what
the gateway's per-caller limits are for.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tessera.runtime.errors import ResourceExhausted

__all__ = ["RateLimiter", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def give_back(self) -> None:
        self.tokens = min(self.burst, self.tokens + 1.0)


class _Buckets:
    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, float(burst), max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # oldest idle key: it was full anyway
        else:
            self._buckets.move_to_end(key)
        return bucket


class RateLimiter:
    """Per-agent and per-tool token buckets; both must have a token for a call to pass."""

    def __init__(
        self,
        *,
        agent_rate: float,
        agent_burst: int,
        tool_rate: float,
        tool_burst: int,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agents = _Buckets(agent_rate, agent_burst, max_keys)
        self._tools = _Buckets(tool_rate, tool_burst, max_keys)
        self._clock = clock

    def acquire(self, *, agent: str, tool: str) -> None:
        """Take one call for ``agent`` on ``tool``, or raise RESOURCE_EXHAUSTED with the
        delay after which a retry can pass."""
        now = self._clock()
        agent_bucket = self._agents.get(agent, now)
        wait = agent_bucket.take(now)
        if wait > 0:
            raise ResourceExhausted(
                f"agent {agent!r} is over its tool-call rate",
                reason="RATE_LIMITED",
                retry_after_s=wait,
                metadata={"scope": "agent", "agent": agent},
            )
        tool_bucket = self._tools.get(tool, now)
        wait = tool_bucket.take(now)
        if wait > 0:
            agent_bucket.give_back()
            raise ResourceExhausted(
                f"tool {tool!r} is over its call rate",
                reason="RATE_LIMITED",
                retry_after_s=wait,
                metadata={"scope": "tool", "tool": tool},
            )
