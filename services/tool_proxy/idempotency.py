"""Exactly-once effects for side-effecting tool calls, recorded in NATS KV.

Record key: ``SHA-256(workflow_id|tool|idempotency_key)`` (hex, the *effect id*) in the
``<ns>_idempotency`` bucket. Life of a record:

1. ``begin``: CAS-create ``{"state": "started", ...}``. Only one caller can create it, so
   only one caller executes.
2. ``finish``: CAS-update to ``{"state": "done", "result": ..., "decision_id": ...}``.
   ``release`` deletes it instead when the call ended *without* executing (e.g. the
   backend refused with a ToolError, Vault was down) so a retry may run.

A retry that finds ``done`` gets the stored result (``replayed = true``) and nothing
runs. One that finds ``started`` gets ABORTED (IDEMPOTENCY_IN_PROGRESS, retryable, with a
RetryInfo of the lease's end) unless the record's lease has ended (``lease_until``: the
claimer's backend deadline plus a margin, so a live executor has given up by then): then
the original executor is presumed dead and the retry takes the record over by CAS (the
backend is idempotent on the effect id, e.g. the outbox's ``Nats-Msg-Id``). The same key
with different arguments is refused (FAILED_PRECONDITION, IDEMPOTENCY_KEY_REUSED).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tessera.runtime.errors import Aborted, FailedPrecondition, Unavailable

__all__ = ["Claim", "IdempotencyStore", "Replay", "effect_id"]

log = structlog.get_logger(__name__)
_ATTEMPTS = 8


def effect_id(workflow_id: str, tool: str, idempotency_key: str) -> str:
    return hashlib.sha256(f"{workflow_id}|{tool}|{idempotency_key}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Claim:
    """This caller owns the execution of ``effect_id`` (record revision ``revision``)."""

    effect_id: str
    revision: int


@dataclass(frozen=True, slots=True)
class Replay:
    """The effect already completed; its stored outcome."""

    effect_id: str
    result: dict[str, Any]
    decision_id: str


class IdempotencyStore:
    def __init__(
        self, kv: KeyValue, *, lease_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._kv = kv
        self._lease_s = lease_s
        self._clock = clock

    async def begin(
        self,
        eid: str,
        *,
        tool: str,
        arguments_digest: str,
        decision_id: str,
        lease_s: float | None = None,
    ) -> Claim | Replay:
        """Claim ``eid`` for ``lease_s`` (default: the store's): as long as the caller may
        still be running the backend, so a claim whose executor died is taken over soon."""
        now = self._clock()
        started = _encode(
            {
                "state": "started",
                "tool": tool,
                "arguments_digest": arguments_digest,
                "decision_id": decision_id,
                "started_at": now,
                "lease_until": now + (self._lease_s if lease_s is None else lease_s),
            }
        )
        try:
            for _ in range(_ATTEMPTS):
                try:
                    return Claim(eid, await self._kv.create(eid, started))
                except KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await self._kv.get(eid)
                except KeyNotFoundError:
                    continue  # released in between: try to create again
                record = json.loads(entry.value or b"{}")
                if record.get("arguments_digest") != arguments_digest:
                    raise FailedPrecondition(
                        "idempotency key already used with other arguments",
                        reason="IDEMPOTENCY_KEY_REUSED",
                        metadata={"tool": tool},
                    )
                if record.get("state") == "done":
                    return Replay(
                        eid, dict(record.get("result") or {}), str(record.get("decision_id", ""))
                    )
                since = float(record.get("started_at", 0.0))
                left = float(record.get("lease_until", since + self._lease_s)) - now
                if left > 0:
                    raise Aborted(
                        "the same call is in progress; retry later",
                        reason="IDEMPOTENCY_IN_PROGRESS",
                        metadata={"tool": tool},
                        # When its executor's lease ends: then this call takes it over.
                        retry_after_s=left,
                    )
                try:
                    revision = await self._kv.update(eid, started, last=entry.revision)
                except KeyWrongLastSequenceError:
                    continue
                log.warning("idempotency_lease_taken_over", tool=tool, age_s=round(now - since, 1))
                return Claim(eid, revision)
        except (Aborted, FailedPrecondition):
            raise
        except Exception as exc:
            log.warning("idempotency_store_unavailable", error=repr(exc))
            raise Unavailable(
                "idempotency store unavailable",
                reason="IDEMPOTENCY_UNAVAILABLE",
                retry_after_s=0.5,
            ) from None
        raise Aborted("idempotency record contended; retry", reason="IDEMPOTENCY_IN_PROGRESS")

    async def finish(
        self,
        claim: Claim,
        *,
        tool: str,
        arguments_digest: str,
        result: dict[str, Any],
        decision_id: str,
    ) -> None:
        """Mark the effect done with its result (retries will replay it)."""
        done = _encode(
            {
                "state": "done",
                "tool": tool,
                "arguments_digest": arguments_digest,
                "decision_id": decision_id,
                "result": result,
                "finished_at": self._clock(),
            }
        )
        try:
            await self._kv.update(claim.effect_id, done, last=claim.revision)
        except KeyWrongLastSequenceError:
            # Our lease was taken over while we ran: the other executor's backend call was
            # deduplicated by the effect id; record our result anyway (same effect).
            log.error("idempotency_lease_lost", tool=tool)
            await self._kv.put(claim.effect_id, done)

    async def release(self, claim: Claim) -> None:
        """Forget a claim whose call did not execute, so a retry may run it."""
        try:
            await self._kv.delete(claim.effect_id, last=claim.revision)
        except Exception as exc:
            log.warning("idempotency_release_failed", error=repr(exc))


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
