"""Bounded retries with exponential backoff and jitter around blocking hvac calls."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TypeVar

import hvac.exceptions
import requests.exceptions

from tessera.vault.errors import VaultUnavailable

T = TypeVar("T")

RETRYABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
)


def backoff_s(attempt: int, *, base_s: float, cap_s: float = 2.0) -> float:
    """Full-jitter exponential backoff for the given 0-based attempt."""
    return random.uniform(0, min(cap_s, base_s * (2**attempt)))


def _unavailable(what: str, exc: BaseException, attempts: int) -> VaultUnavailable:
    return VaultUnavailable(
        f"vault unavailable: {what} failed after {attempts} attempts ({type(exc).__name__})",
        retry_after_s=1.0,
    )


def call_sync(what: str, fn: Callable[[], T], *, attempts: int = 4, base_s: float = 0.2) -> T:
    """Run ``fn``, retrying connection errors and 5xx; raise :class:`VaultUnavailable`."""
    for attempt in range(attempts):
        try:
            return fn()
        except RETRYABLE as exc:
            if attempt == attempts - 1:
                raise _unavailable(what, exc, attempts) from exc
            time.sleep(backoff_s(attempt, base_s=base_s))
    raise AssertionError("unreachable")


async def call_async(
    what: str, fn: Callable[[], T], *, attempts: int = 3, base_s: float = 0.05
) -> T:
    """Like :func:`call_sync`, but runs ``fn`` in a worker thread, off the event loop."""
    for attempt in range(attempts):
        try:
            return await asyncio.to_thread(fn)
        except RETRYABLE as exc:
            if attempt == attempts - 1:
                raise _unavailable(what, exc, attempts) from exc
            await asyncio.sleep(backoff_s(attempt, base_s=base_s))
    raise AssertionError("unreachable")
