"""Reading workflow histories (``tessera.v1.WorkflowHistoryEntry`` messages) from
JetStream: decoding an entry, and reading many messages of a subject filter in one
batched direct get (nats-server 2.11+), so rebuilding a workflow or reading a page of a
listing costs one request, not one per message."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.subscription import Subscription

from tessera.runtime.errors import Unavailable
from tessera.v1 import events_pb2

__all__ = ["TERMINAL_EVENTS", "StoredMsg", "entry_events", "read_batch"]

TERMINAL_EVENTS = frozenset({"workflow_completed", "workflow_failed", "workflow_cancelled"})
"""The kinds of WorkflowEvent that end a workflow's history."""

_END_OF_BATCH = "204"
_NOT_FOUND = "404"
# What one request asks for; the server may answer fewer (its own cap) and says how
# many are left, so a long read simply continues.
_BATCH = 256


@dataclass(frozen=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes


def entry_events(data: bytes) -> list[events_pb2.WorkflowEvent]:
    """The events of one history entry, in order."""
    return list(events_pb2.WorkflowHistoryEntry.FromString(data).events)


async def read_batch(
    nc: Client,
    stream: str,
    subject: str,
    *,
    after: int = 0,
    until: int | None = None,
    limit: int | None = None,
    timeout_s: float = 5.0,
) -> list[StoredMsg]:
    """The messages of ``stream`` on ``subject`` (wildcards allowed) with a sequence
    above ``after``, oldest first, at most ``limit`` (None: all); reading stops at the
    first at or past ``until``, which is included. The stream must allow direct gets.
    Raises :class:`Unavailable` when NATS does not answer in time."""
    out: list[StoredMsg] = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        async with asyncio.timeout(timeout_s):
            while limit is None or len(out) < limit:
                want = _BATCH if limit is None else min(_BATCH, limit - len(out))
                request = {"seq": after + 1, "next_by_subj": subject, "batch": want}
                await nc.publish(
                    f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
                )
                got, pending = await _collect(sub, out)
                if not got or not pending or (until is not None and out[-1].seq >= until):
                    break
                after = out[-1].seq
    except TimeoutError:
        raise Unavailable(
            f"no answer from JetStream reading {stream}", reason="HISTORY_UNAVAILABLE"
        ) from None
    finally:
        await sub.unsubscribe()
    return out


async def _collect(sub: Subscription, out: list[StoredMsg]) -> tuple[int, int]:
    """Read one batch's answers into ``out``: (messages read, messages the server says
    are still pending after it)."""
    got = 0
    while True:
        msg = await sub.next_msg(timeout=None)  # type: ignore[arg-type]
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == _NOT_FOUND:
            return got, 0
        if status == _END_OF_BATCH:
            return got, int(headers.get("Nats-Num-Pending") or 0)
        if status:
            raise Unavailable(
                f"JetStream refused a direct get: {status}", reason="HISTORY_UNAVAILABLE"
            )
        out.append(
            StoredMsg(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data or b"")
        )
        got += 1
