"""Once-only execution per task attempt: in-flight joins and a bounded result cache."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Deduplicator"]

T = TypeVar("T")


class Deduplicator(Generic[T]):
    """Runs ``work`` at most once per key while its result is remembered.

    * a call whose key is running joins the running task (and its outcome);
    * a call whose key completed returns the cached result (LRU, ``max_entries``);
    * a failure is not cached: the next call with that key runs again;
    * the work runs in its own task, so a caller that goes away (cancelled RPC) does not
      cancel it; its result is cached for the retry.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._done: OrderedDict[Hashable, T] = OrderedDict()
        self._running: dict[Hashable, asyncio.Task[T]] = {}

    def cached(self, key: Hashable) -> tuple[bool, T | None]:
        """(hit, result) for a completed key, refreshing its LRU position."""
        if key in self._done:
            self._done.move_to_end(key)
            return True, self._done[key]
        return False, None

    def running(self, key: Hashable) -> asyncio.Task[T] | None:
        return self._running.get(key)

    def start(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """Start ``work`` for ``key`` (the caller checked :meth:`cached`/:meth:`running`)."""
        if key in self._running:
            raise RuntimeError(f"{key!r} is already running")

        async def runner() -> T:
            result = await work()
            self._done[key] = result
            self._done.move_to_end(key)
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)
            return result

        task = asyncio.create_task(runner(), name=f"execute-{key!r}")
        self._running[key] = task

        def forget(done: asyncio.Task[T]) -> None:
            if self._running.get(key) is done:
                del self._running[key]
            if not done.cancelled():
                # Seen here, so a failure whose caller went away is not reported as
                # "never retrieved": it is not cached, and the attempt's retry runs again.
                done.exception()

        task.add_done_callback(forget)
        return task

    async def cancel_all(self) -> None:
        """Cancel every running task and wait for them to finish."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
