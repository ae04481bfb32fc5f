"""Reading the audit stream back: entries in stream order, and ``tail``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats.errors
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from tessera.runtime.bus import Topology
from tessera.runtime.errors import Unavailable
from tessera.v1 import audit_pb2

__all__ = ["AuditEntry", "parse_record", "tail"]


@dataclass(frozen=True)
class AuditEntry:
    """A record as read back: where it is stored and which chain it belongs to.
    ``record`` is ``None`` when the stored bytes do not parse."""

    stream_sequence: int
    writer: str
    record: audit_pb2.AuditRecord | None = field(repr=False)
    carried_by: int = 0
    """For a record written in another's ``carried`` field (:func:`tail` lists those on
    their own): that record's chain sequence."""
    data: bytes = field(default=b"", repr=False)
    """The stored bytes (what an export writes)."""
    owner: str = ""
    """The identity whose subjects hold the chain (``<ns>.audit.<owner>.<writer>``: only
    that identity may publish there); empty for a chain on the default subject."""


def parse_record(data: bytes) -> audit_pb2.AuditRecord | None:
    record = audit_pb2.AuditRecord()
    try:
        record.ParseFromString(data)
    except DecodeError:
        return None
    return record


async def entries(
    js: JetStreamContext,
    topology: Topology,
    *,
    start_seq: int,
    stop_seq: int | None,
    idle_timeout_s: float = 5.0,
) -> AsyncIterator[AuditEntry]:
    """Stored entries from ``start_seq`` in stream order; stops after ``stop_seq``
    (``None``: never). Raises Unavailable when the stream stops answering."""
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start_seq, 1)
    )
    sub = await js.subscribe(
        topology.audit_subjects,
        stream=topology.audit_stream,
        ordered_consumer=True,
        config=config,
        idle_heartbeat=2.0,
    )
    prefix = topology.audit_subjects.removesuffix(">")
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout_s if stop_seq is not None else 3600)
            except nats.errors.TimeoutError:
                if stop_seq is None:
                    continue
                raise Unavailable("audit stream stopped answering") from None
            seq = msg.metadata.sequence.stream
            data = msg.data or b""
            # `<ns>.audit.<writer>` or `<ns>.audit.<owner>.<writer>`: the chain is the last token.
            owner, _, writer = msg.subject.removeprefix(prefix).rpartition(".")
            yield AuditEntry(seq, writer, parse_record(data), data=data, owner=owner)
            # Deleted messages never arrive: also stop when nothing is pending any more.
            if stop_seq is not None and (seq >= stop_seq or msg.metadata.num_pending == 0):
                return
    finally:
        await sub.unsubscribe()


async def stream_bounds(js: JetStreamContext, topology: Topology) -> tuple[int, int, int]:
    """First and last stream sequence and message count of the audit stream."""
    info = await js.stream_info(topology.audit_stream)
    state = info.state
    return state.first_seq, state.last_seq, state.messages


async def tail(
    js: JetStreamContext, topology: Topology, *, follow: bool = False, n: int = 20
) -> AsyncIterator[AuditEntry]:
    """The last ``n`` stored records of all chains in stream order; with ``follow``, then
    every new record as it is stored (until the caller stops iterating). The records a
    stored record carries are listed on their own, just before it."""
    try:
        first, last, count = await stream_bounds(js, topology)
    except NotFoundError:
        return
    if not count and not follow:
        return
    start = max(first, last - max(n, 0) + 1) if count else last + 1
    if not follow and start > last:
        return
    async for entry in entries(js, topology, start_seq=start, stop_seq=None if follow else last):
        if entry.record is not None:
            for carried in entry.record.carried:
                yield AuditEntry(
                    entry.stream_sequence, entry.writer, carried, entry.record.sequence
                )
        yield entry
