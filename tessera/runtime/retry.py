"""Retrying a NATS call through a transient fault, bounded in time.

A JetStream stream or KV bucket answers nothing (or 503) while it elects a leader, and a
client sees a timeout or "no responders" while its server restarts. Those faults pass in
seconds; the caller should wait them out instead of failing the work. Anything else (a
wrong revision, a missing key, bad input) is an answer, and propagates at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import structlog
from nats.js import errors as js_errors

log = structlog.get_logger(__name__)

T = TypeVar("T")

__all__ = ["is_transient_nats_error", "retry_transient"]

_DUPLICATE_IN_PROCESS = 10158


def is_transient_nats_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a NATS fault that a later retry can get past."""
    if isinstance(exc, js_errors.ServiceUnavailableError):
        return True
    if isinstance(exc, js_errors.APIError):
        # 503: JetStream temporarily unavailable (no leader yet). 10158: a clustered
        # stream is still storing another publish with the same message id; retried, the
        # publish is answered as the duplicate it is.
        return exc.code == 503 or exc.err_code == _DUPLICATE_IN_PROCESS
    return isinstance(
        exc,
        (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            asyncio.TimeoutError,
            ConnectionError,
        ),
    )


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    within_s: float,
    what: str,
    base_s: float = 0.05,
    max_s: float = 1.0,
    retry_if: Callable[[BaseException], bool] = is_transient_nats_error,
) -> T:
    """``await call()``, retried with capped exponential backoff and jitter while it
    raises a transient fault (by default a NATS one; ``retry_if`` says otherwise, e.g.
    for a gRPC peer) and ``within_s`` has not passed; then the last fault propagates."""
    give_up = time.monotonic() + within_s
    delay = base_s
    tries = 0
    while True:
        tries += 1
        try:
            return await call()
        except Exception as exc:
            left = give_up - time.monotonic()
            if not retry_if(exc) or left <= 0:
                raise
            pause = min(left, delay / 2 + random.uniform(0, delay / 2))
            if tries == 1:
                log.info("nats_transient_fault_retrying", what=what, error=type(exc).__name__)
            await asyncio.sleep(pause)
            delay = min(max_s, delay * 2)
