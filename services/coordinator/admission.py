"""Admission control: `StartWorkflow` refuses new work while the mesh is saturated, so a
burst is turned away with RESOURCE_EXHAUSTED (and a RetryInfo) instead of piling up
until every workflow slows past its deadline.

The measure is the backlog as JetStream counts it for the coordinators' shared consumers
(new workflows' start entries and the work queue): steps waiting plus steps being run,
i.e. workflows that are running or queued, across every replica. Workflows parked on a
gate hold no step and do not count. It is read at most every ``cache_s``: between two
reads a replica may admit a few more than the limit, which is what a limit of this kind
is for (shedding a burst, not counting exactly).
"""

from __future__ import annotations

import time

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.coordinator import metrics
from tessera.runtime.errors import ResourceExhausted
from tessera.runtime.retry import is_transient_nats_error

log = structlog.get_logger(__name__)


class Admission:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        consumers: list[tuple[str, str]],
        limit: int,
        cache_s: float = 0.25,
        retry_after_s: float = 1.0,
    ) -> None:
        self._js = js
        self._consumers = consumers
        """(stream, durable consumer) pairs whose backlogs add up."""
        self.limit = limit
        self._cache_s = cache_s
        self._retry_after_s = retry_after_s
        self._backlog = 0
        self._read_at = float("-inf")

    async def backlog(self) -> int:
        now = time.monotonic()
        if now - self._read_at >= self._cache_s:
            try:
                self._backlog = sum([await self._consumer_backlog(*c) for c in self._consumers])
            except Exception as exc:
                if not is_transient_nats_error(exc):
                    raise
                # NATS is electing a leader: admit on the last known backlog; the start's
                # own writes fail (and are retried by the client) if NATS is really down.
                log.info("admission_backlog_unknown", error=type(exc).__name__)
            self._read_at = now
        return self._backlog

    async def _consumer_backlog(self, stream: str, consumer: str) -> int:
        try:
            info = await self._js.consumer_info(stream, consumer, timeout=1.0)
        except NotFoundError:
            return 0  # no worker has started yet: nothing is queued for one
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def admit(self) -> None:
        """Raise RESOURCE_EXHAUSTED (MESH_BUSY, retry after a second) when saturated."""
        backlog = await self.backlog()
        if backlog >= self.limit:
            metrics.WORKFLOWS_REFUSED.inc()
            raise ResourceExhausted(
                f"the mesh is running {backlog} workflows, its limit: retry later",
                reason="MESH_BUSY",
                metadata={"active_workflows": str(backlog), "limit": str(self.limit)},
                retry_after_s=self._retry_after_s,
            )
