"""Start-up steps that wait out a dependency which is not ready yet, bounded in time.

A process may start while NATS is still electing JetStream leaders (a fresh cluster, a
stream or bucket just created with replicas) or while a NATS server or Vault restarts.
Every start-up step that talks to one of them (the first NATS connection, declaring
streams and buckets, the Vault login, the first registry registration) goes through
:func:`until_ready`: retried with capped exponential backoff and jitter while the fault is
one that passes, for at most ``within_s`` (``CommonSettings.startup_timeout_s``, 30 s
unless set). After that the last fault propagates and the process exits, which the
launcher reports. A slow dependency delays a start; it does not crash it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import structlog
from nats.js import errors as js_errors

from tessera.runtime.config import STARTUP_TIMEOUT_S
from tessera.runtime.retry import is_transient_nats_error

__all__ = ["STARTUP_TIMEOUT_S", "NotReadyYet", "not_ready_yet", "until_ready"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 1.0
_NO_SUITABLE_PEERS = 10005  # JetStream: no suitable peers for placement (cluster forming)


class NotReadyYet(Exception):
    """A dependency answered, but is not ready yet (e.g. a stream without a leader)."""


def not_ready_yet(exc: BaseException) -> bool:
    """Whether ``exc`` is what NATS answers while it (or a stream) is still coming up.

    That is a transient NATS fault (:func:`tessera.runtime.retry.is_transient_nats_error`:
    timeouts, no responders, JetStream 503, lost connection), a publish that no stream
    answered (its leader is not elected yet), "no suitable peers" (a cluster still
    forming), no server accepting connections yet, or :class:`NotReadyYet`.
    """
    if isinstance(exc, NotReadyYet | js_errors.NoStreamResponseError | nats.errors.NoServersError):
        return True
    if isinstance(exc, js_errors.BadRequestError) and exc.err_code == _NO_SUITABLE_PEERS:
        return True
    return is_transient_nats_error(exc)


async def until_ready(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    within_s: float | None = STARTUP_TIMEOUT_S,
    attempt_s: float | None = None,
    retry_if: Callable[[BaseException], bool] = not_ready_yet,
) -> T:
    """``await call()`` until it succeeds, retrying while it raises a fault ``retry_if``
    accepts, for at most ``within_s`` seconds overall, each attempt included (``None``:
    no bound). ``attempt_s`` cuts one attempt that takes longer (a request a busy cluster
    leaves unanswered) and retries it as a timeout.

    Waits 0.025-0.05 s after the first failure, doubling up to 0.5-1 s (jittered, so
    replicas that start together do not retry in step). Any other exception propagates at
    once; at the deadline the last fault does (a ``TimeoutError`` if an attempt was still
    running). ``call`` must be safe to repeat.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    give_up = math.inf if within_s is None else started + within_s
    delay = _FIRST_DELAY_S
    attempts = 0
    last: BaseException | None = None
    while True:
        attempts += 1
        ends = give_up if attempt_s is None else min(give_up, loop.time() + attempt_s)
        scope = asyncio.timeout_at(None if ends == math.inf else ends)
        try:
            async with scope:
                result = await call()
        except Exception as exc:
            if scope.expired() and loop.time() >= give_up:
                seen = "" if last is None else f" (last fault: {last!r})"
                raise TimeoutError(f"{what}: not ready within {within_s}s{seen}") from exc
            if not retry_if(exc) or loop.time() >= give_up:
                if attempts > 1:
                    log.warning(
                        "startup_wait_failed", what=what, attempts=attempts, error=repr(exc)
                    )
                raise
            last = exc
        else:
            if attempts > 1:
                waited = round(loop.time() - started, 3)
                log.info("startup_wait_over", what=what, attempts=attempts, waited_s=waited)
            return result
        if attempts == 1:
            log.info("startup_waiting", what=what, error=repr(last))
        await asyncio.sleep(max(0.0, min(random.uniform(delay / 2, delay), give_up - loop.time())))
        delay = min(_MAX_DELAY_S, delay * 2)
