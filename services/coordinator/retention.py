"""Retention: a workflow that ended more than ``retention_s`` ago leaves the hot state.
Its history is purged from the stream (a purge by subject) and its snapshot from the
bucket; before that, `tessera export` (WatchWorkflow from sequence 1) writes it out.

A sweep reads the start entries oldest first (creation order) and stops at the first
workflow younger than the retention, so it costs a request per page of expired or
still-running old workflows, not one per workflow that exists. Every replica sweeps; a
purge is idempotent, so two replicas sweeping at once only repeat each other's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import structlog

from services.coordinator.store import WorkflowStore
from tessera.runtime.history import TERMINAL_EVENTS, entry_events

__all__ = ["Retention"]

log = structlog.get_logger(__name__)

_PAGE = 256


class Retention:
    def __init__(self, store: WorkflowStore, *, retention_s: float, interval_s: float) -> None:
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="coordinator-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        # Replicas started together do not sweep in lockstep.
        await asyncio.sleep(random.uniform(0, self.interval_s))
        while True:
            try:
                removed = await self.sweep(time.time())
                if removed:
                    log.info("workflows_expired", removed=removed)
            except Exception as exc:  # NATS unavailable: the next sweep catches up
                log.warning("retention_sweep_failed", error=repr(exc))
            await asyncio.sleep(self.interval_s)

    async def sweep(self, now: float) -> int:
        """Remove every workflow that ended before ``now - retention_s``; how many."""
        cutoff = now - self.retention_s
        removed, after = 0, 0
        while True:
            starts = await self.store.starts_after(after, _PAGE)
            for msg in starts:
                first = entry_events(msg.data)[0]
                if first.time.ToMicroseconds() / 1e6 >= cutoff:
                    return removed  # this one and every later one are younger
                last = await self.store.last_event(first.workflow_id)
                if (
                    last is not None
                    and last.WhichOneof("kind") in TERMINAL_EVENTS
                    and last.time.ToMicroseconds() / 1e6 < cutoff
                ):
                    await self.store.remove(first.workflow_id)
                    removed += 1
            if len(starts) < _PAGE:
                return removed
            after = starts[-1].seq
