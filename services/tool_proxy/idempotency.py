"""Exactly-once effects for side-effecting tool calls, recorded in NATS KV.

Record key: ``SHA-256(workflow_id|tool|idempotency_key)`` (hex, the *effect id*) in the
``<ns>_idempotency`` bucket. Life of a record:

1. ``begin``: CAS-create ``{"state": "started", ...}``. Only one caller can create it, so
   only one caller executes.
2. ``finish``: CAS-update to ``{"state": "done", "result": ..., "decision_id": ...}``,
   retried through faults of the KV (a bucket electing a leader answers nothing) for
   ``finish_within_s``: once the effect ran, its outcome must be recorded. ``release``
   deletes the record instead when the call ended *without* executing (e.g. the backend
   refused with a ToolError, Vault was down) so a retry may run.

A retry that finds ``done`` gets the stored result (``replayed = true``) and nothing
runs. One that finds ``started`` gets ABORTED (IDEMPOTENCY_IN_PROGRESS, retryable, with a
RetryInfo of the lease's end) unless the record's lease has ended (``lease_until``: the
claimer's backend deadline plus a margin, so a live executor has given up by then). Then
the original executor is presumed dead, but its effect may have happened: the retry first
asks the backend (``lookup``, see ``tools.registry.Lookup``). It ran: the record becomes
``done`` with the backend's result, replayed. It did not: the retry takes the record over
by CAS and runs. The backend cannot tell (no lookup, or UNKNOWN): FAILED_PRECONDITION
``EFFECT_OUTCOME_UNKNOWN``, nothing runs, a human decides (tool proxy README). The same key
with different arguments is refused (FAILED_PRECONDITION, IDEMPOTENCY_KEY_REUSED).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.tool_proxy.tools.registry import EffectLookup, EffectStatus
from tessera.runtime.errors import Aborted, FailedPrecondition, Unavailable
from tessera.runtime.retry import retry_transient

__all__ = ["AskBackend", "Claim", "IdempotencyStore", "Replay", "effect_id"]

log = structlog.get_logger(__name__)
_ATTEMPTS = 8

AskBackend = Callable[[float], Awaitable[EffectLookup]]
"""Asks the tool whether the effect happened, given when it was first claimed (wall
clock, seconds): a ``tools.registry.Lookup`` bound to the call."""


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
    recovered: bool = False
    """The record was ``started`` by an executor presumed dead and the backend said the
    effect had happened: ``result`` is the backend's, now recorded ``done``."""


class IdempotencyStore:
    def __init__(
        self,
        kv: KeyValue,
        *,
        lease_s: float,
        finish_within_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kv = kv
        self._lease_s = lease_s
        self._finish_within_s = finish_within_s
        self._clock = clock

    async def begin(
        self,
        eid: str,
        *,
        tool: str,
        arguments_digest: str,
        decision_id: str,
        lease_s: float | None = None,
        lookup: AskBackend | None = None,
        lookup_timeout_s: float = 10.0,
    ) -> Claim | Replay:
        """Claim ``eid`` for ``lease_s`` (default: the store's): as long as the caller may
        still be running the backend, so a claim whose executor died is taken over soon.

        A claim whose lease ended is taken over only if ``lookup`` (bounded by
        ``lookup_timeout_s``) says the effect did not happen; if it did, its result is
        recorded and replayed. No lookup, or an UNKNOWN answer: FAILED_PRECONDITION
        ``EFFECT_OUTCOME_UNKNOWN``; a lookup that fails: UNAVAILABLE
        ``EFFECT_LOOKUP_UNAVAILABLE`` (the record is left as it was in both cases)."""
        now = self._clock()
        lease_until = now + (self._lease_s if lease_s is None else lease_s)
        fields = {"tool": tool, "arguments_digest": arguments_digest, "decision_id": decision_id}
        started = _started(fields, now=now, lease_until=lease_until, claimed_at=now)
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
                # The executor is presumed dead: did its effect happen? (The record stays
                # as it is meanwhile; the CAS below settles races between retries.)
                claimed_at = float(record.get("claimed_at", since))
                answer = await self._ask(lookup, claimed_at, eid, tool, lookup_timeout_s)
                try:
                    if answer.status is EffectStatus.EXECUTED:
                        result = dict(answer.result or {})
                        recorded = str(record.get("decision_id", ""))
                        done = _done({**fields, "decision_id": recorded}, result, now)
                        await self._kv.update(eid, done, last=entry.revision)
                        log.warning("idempotency_outcome_recovered", tool=tool, effect_id=eid)
                        return Replay(eid, result, recorded, recovered=True)
                    takeover = _started(
                        fields, now=now, lease_until=lease_until, claimed_at=claimed_at
                    )
                    revision = await self._kv.update(eid, takeover, last=entry.revision)
                except KeyWrongLastSequenceError:
                    continue  # another retry got there first: see what it wrote
                log.warning("idempotency_lease_taken_over", tool=tool, age_s=round(now - since, 1))
                return Claim(eid, revision)
        except (Aborted, FailedPrecondition, Unavailable):
            raise
        except Exception as exc:
            log.warning("idempotency_store_unavailable", error=repr(exc))
            raise Unavailable(
                "idempotency store unavailable",
                reason="IDEMPOTENCY_UNAVAILABLE",
                retry_after_s=0.5,
            ) from None
        raise Aborted("idempotency record contended; retry", reason="IDEMPOTENCY_IN_PROGRESS")

    async def _ask(
        self,
        lookup: AskBackend | None,
        claimed_at: float,
        eid: str,
        tool: str,
        timeout_s: float,
    ) -> EffectLookup:
        """The backend's answer for a taken-over claim; raises unless it knows."""
        if lookup is None:
            answer = EffectLookup.unknown("the tool cannot look its effects up")
        else:
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await lookup(claimed_at)
            except Exception as exc:
                log.warning("effect_lookup_failed", tool=tool, effect_id=eid, error=repr(exc))
                raise Unavailable(
                    "could not ask the tool whether an interrupted call's effect happened",
                    reason="EFFECT_LOOKUP_UNAVAILABLE",
                    metadata={"tool": tool, "effect_id": eid},
                    retry_after_s=1.0,
                ) from None
        if answer.status is not EffectStatus.UNKNOWN:
            return answer
        log.error(
            "effect_outcome_unknown",
            tool=tool,
            effect_id=eid,
            detail=answer.detail,
            action="a human must resolve the idempotency record (tool proxy README)",
        )
        raise FailedPrecondition(
            "an earlier executor of this call died and the tool cannot tell whether its "
            "effect happened: not running it again",
            reason="EFFECT_OUTCOME_UNKNOWN",
            metadata={"tool": tool, "effect_id": eid},
            violations=[("EFFECT_OUTCOME", f"idempotency/{eid}", "resolve by hand")],
        )

    async def finish(
        self,
        claim: Claim,
        *,
        tool: str,
        arguments_digest: str,
        result: dict[str, Any],
        decision_id: str,
    ) -> None:
        """Mark the effect done with its result (retries will replay it).

        Retried with capped exponential backoff and jitter through transient KV faults
        for ``finish_within_s``, each attempt bounded by the time left. Gives up with
        UNAVAILABLE ``IDEMPOTENCY_OUTCOME_UNRECORDED`` (logged as an error): the record
        then stays ``started``, and a retry after its lease asks the backend."""
        fields = {"tool": tool, "arguments_digest": arguments_digest, "decision_id": decision_id}
        done = _done(fields, result, self._clock())
        give_up = time.monotonic() + self._finish_within_s

        async def attempt() -> None:
            async with asyncio.timeout(max(give_up - time.monotonic(), 0.0)):
                await self._record_done(claim, done, tool)

        try:
            await retry_transient(
                attempt, within_s=self._finish_within_s, what="idempotency_finish"
            )
        except Exception as exc:
            log.error(
                "idempotency_outcome_unrecorded",
                tool=tool,
                effect_id=claim.effect_id,
                within_s=self._finish_within_s,
                error=repr(exc),
            )
            raise Unavailable(
                "the tool ran but its outcome could not be recorded; a retry replays it "
                "once the idempotency store is back",
                reason="IDEMPOTENCY_OUTCOME_UNRECORDED",
                metadata={"tool": tool, "effect_id": claim.effect_id},
                retry_after_s=1.0,
            ) from None

    async def _record_done(self, claim: Claim, done: bytes, tool: str) -> None:
        try:
            await self._kv.update(claim.effect_id, done, last=claim.revision)
            return
        except KeyWrongLastSequenceError:
            pass
        # An earlier attempt landed without its answer, or the record was taken over or
        # resolved meanwhile. Our effect happened: make sure the record says so.
        for _ in range(_ATTEMPTS):
            try:
                entry = await self._kv.get(claim.effect_id)
            except KeyNotFoundError:
                try:
                    await self._kv.create(claim.effect_id, done)
                    return
                except KeyWrongLastSequenceError:
                    continue
            if json.loads(entry.value or b"{}").get("state") == "done":
                return
            log.error("idempotency_lease_lost", tool=tool, effect_id=claim.effect_id)
            try:
                await self._kv.update(claim.effect_id, done, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError("idempotency record contended while recording its outcome")

    async def in_flight(self, eid: str) -> float | None:
        """Seconds left on a live ``started`` claim of ``eid`` (its executor may be
        running the backend right now); None when there is none (no record, ``done``, or
        a lease that ended). Raises UNAVAILABLE when the bucket cannot be read."""
        try:
            entry = await self._kv.get(eid)
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise Unavailable(
                "the idempotency store cannot be read", reason="IDEMPOTENCY_UNAVAILABLE"
            ) from exc
        record = json.loads(entry.value or b"{}")
        if record.get("state") != "started":
            return None
        left = float(record.get("lease_until", 0)) - self._clock()
        return left if left > 0 else None

    async def release(self, claim: Claim) -> None:
        """Forget a claim whose call did not execute, so a retry may run it."""
        try:
            await self._kv.delete(claim.effect_id, last=claim.revision)
        except Exception as exc:
            log.warning("idempotency_release_failed", error=repr(exc))


def _started(fields: dict[str, str], *, now: float, lease_until: float, claimed_at: float) -> bytes:
    """``claimed_at``: when the effect was first claimed (kept across takeovers), so a
    backend's lookup knows how far back the effect may have happened."""
    return _encode(
        {
            **fields,
            "state": "started",
            "started_at": now,
            "lease_until": lease_until,
            "claimed_at": claimed_at,
        }
    )


def _done(fields: dict[str, str], result: dict[str, Any], now: float) -> bytes:
    return _encode({**fields, "state": "done", "result": result, "finished_at": now})


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
