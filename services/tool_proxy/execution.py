"""Running a tool's backend for a governed call, and recording what it did.

Once a backend may have performed its effect, the outcome must be recorded whatever
happens to the caller: :class:`Detached` runs such work as a task of its own that
outlives a cancelled caller (a gRPC client that went away), and :func:`execute` never
releases the idempotency claim of an effect that may have happened (only a ToolError
promises that nothing did).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from services.tool_proxy.idempotency import Claim, IdempotencyStore
from services.tool_proxy.tools.registry import CallInfo, Tool, ToolError
from tessera.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    TesseraError,
    Unavailable,
)
from tessera.vault.tokens import ToolSecret

__all__ = ["Detached", "Execution", "canonical", "execute"]

log = structlog.get_logger(__name__)
T = TypeVar("T")


def canonical(value: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces): what digests and size limits measure."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Detached:
    """Work that must reach its end even when its caller is cancelled."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """``await work``, run as a task of its own: cancelling the caller leaves it
        running to its end (how it ended is then logged, as nobody else hears of it)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(_log_abandoned)
            raise

    async def wait(self) -> None:
        """Wait until the work running now has ended (its errors went to its callers)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Execution:
    """One backend call of a governed tool call."""

    tool: Tool
    arguments: Mapping[str, Any]
    secret: ToolSecret | None
    info: CallInfo
    claim: Claim | None
    """The idempotency claim of a side-effecting call (None: read-only)."""
    arguments_digest: str
    timeout_s: float


async def execute(
    run: Execution, *, store: IdempotencyStore, max_result_bytes: int
) -> dict[str, Any]:
    """The backend under ``run.timeout_s``; then, as its effect may have happened, its
    outcome recorded (``finish`` retries through KV faults; the claim is never released:
    a timeout leaves it ``started``). A ToolError promises that nothing happened: the
    claim is released so a retry may run, and the call is refused."""
    spec = run.tool.spec
    try:
        async with asyncio.timeout(run.timeout_s):
            result = await run.tool.handler(run.arguments, run.secret, run.info)
    except TimeoutError:
        raise DeadlineExceeded(
            f"{spec.name!r} did not answer within {run.timeout_s:.3g}s",
            reason="TOOL_DEADLINE_EXCEEDED",
            metadata={"tool": spec.name},
        ) from None
    except ToolError as exc:
        if run.claim is not None:
            await store.release(run.claim)
        if exc.retry_after_s is not None:
            raise Unavailable(
                exc.message,
                reason=exc.reason,
                retry_after_s=exc.retry_after_s,
                metadata={"tool": spec.name},
            ) from None
        raise FailedPrecondition(
            exc.message, reason=exc.reason, metadata={"tool": spec.name}
        ) from None
    size = len(canonical(result))
    if size > max_result_bytes:
        raise ResourceExhausted(f"{spec.name!r} returned {size} bytes", reason="RESULT_TOO_LARGE")
    if run.claim is not None:
        await store.finish(
            run.claim,
            tool=spec.name,
            arguments_digest=run.arguments_digest,
            result=result,
            decision_id=run.info.decision_id,
        )
    return result


def _log_abandoned(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        log.warning("detached_work_cancelled")
        return
    exc = task.exception()
    if exc is not None:
        reason = exc.reason if isinstance(exc, TesseraError) else type(exc).__name__
        log.warning("detached_work_failed_after_caller_left", reason=reason)
