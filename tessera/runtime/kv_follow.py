"""Following a whole KV bucket from another process: the current values, then every
change, for as long as the follower runs, re-watching after NATS hiccups.

Readers of buckets another service owns (the frozen agents, the distributed policy set)
keep a local view this way; what they do with each entry is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

__all__ = ["BucketFollower"]

log = structlog.get_logger(__name__)


class BucketFollower:
    """Runs ``apply`` for every entry of ``bucket`` (the current values first, then each
    change) in a background task between :meth:`start` and :meth:`stop`.

    ``restarted`` runs before each watch begins (the first, and each after a failure: the
    current values come again) and ``caught_up`` once a watch has delivered them.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        apply: Callable[[KeyValue.Entry], Awaitable[None]],
        *,
        restarted: Callable[[], None] | None = None,
        caught_up: Callable[[], None] | None = None,
        retry_s: float = 1.0,
    ) -> None:
        self._js = js
        self._bucket = bucket
        self._apply = apply
        self._restarted = restarted
        self._caught_up = caught_up
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=f"follow:{self._bucket}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        while True:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS reconnecting: the local view ages meanwhile
                log.warning("bucket_watch_failed", bucket=self._bucket, error=type(exc).__name__)
                await asyncio.sleep(self._retry_s)

    async def _watch(self) -> None:
        kv = await self._js.key_value(self._bucket)
        watcher = await kv.watchall()
        if self._restarted is not None:
            self._restarted()
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # the current values are all delivered
                    if self._caught_up is not None:
                        self._caught_up()
                    continue
                await self._apply(entry)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
