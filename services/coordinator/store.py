"""Workflow persistence on JetStream: each workflow's history, appended once per step and
fenced; KV snapshots now and then; the work queue.

The history is the source of truth. A workflow's first entry is on
``<ns>.wf.<id>.start``, every later one on ``<ns>.wf.<id>.events``; an entry
(``WorkflowHistoryEntry``) holds all of one step's events. Every append carries
``Nats-Expected-Last-Subject-Sequence`` over ``<ns>.wf.<id>.*``: it is stored only if the
workflow's last entry is still the one its writer read (the *revision*). So two replicas can
never both advance a workflow (the loser gets :class:`Conflict`, reloads and carries on),
and a second start of the same workflow is refused: the first append is the start's
idempotency claim (the id is derived from the request id, services/coordinator/service.py).

State is the events replayed through ``apply_event``. A snapshot (the state and the
sequence of the entry it reflects) is put in the KV bucket once the entries appended since
the last one are at least twice the state (and at least ``SNAPSHOT_MIN_BYTES``): a reload
reads the snapshot and the entries after it, in one batched direct get, and the bytes
written per step stay flat however large the workflow grows (each snapshot is paid for
by twice as many bytes of history). A stale snapshot is harmless: the tail is longer.

The replica that last wrote a workflow keeps it in memory (:meth:`checkin`), so the next
step there needs no read at all; the fence catches a copy that went stale.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog
from google.protobuf import timestamp_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from services.coordinator.state import WorkflowRecord, apply_event
from tessera.runtime.bus import Topology, msg_id_headers
from tessera.runtime.history import StoredMsg, entry_events, read_batch
from tessera.runtime.retry import retry_transient
from tessera.v1 import events_pb2

log = structlog.get_logger(__name__)

ADVANCE = "advance"
"""Work subject kind of "advance this workflow now" steps (the runner consumes them)."""
STARTS_DURABLE = "coordinator-starts"
"""The runners' consumer of new workflows (their start entries)."""
TIMER = "timer"
"""Work subject kind of timer steps, held until their ``not_before`` (timers.py)."""
SNAPSHOT_MIN_BYTES = 64 * 1024
"""No snapshot before this much history: a short workflow is rebuilt from its entries."""
CACHE_SIZE = 1024
"""Workflows this replica keeps in memory after writing them (least recently used go)."""

_WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence mismatch


def start_id(request_id: str) -> str:
    """The id of the workflow a start with ``request_id`` creates. Derived, so a retried
    start names the same workflow, and its fenced first append is the start's claim."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:20]


class Conflict(Exception):
    """Another writer advanced the workflow first; this step's view is stale."""


class WorkflowStore:
    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        nc: Client,
        on_published: Callable[[list[events_pb2.WorkflowEvent]], Awaitable[None]] | None = None,
        cache_size: int = CACHE_SIZE,
        replicated: bool = False,
    ) -> None:
        self.js = js
        self.replicated = replicated
        """Whether the history stream has several replicas (reads confirm with the leader)."""
        self.nc = nc
        self.topology = topology
        self.on_published = on_published
        """Told of every event once it is in the history (the audit trail listens)."""
        self._kv: KeyValue | None = None
        self._cache: OrderedDict[str, tuple[WorkflowRecord, int]] = OrderedDict()
        self._cache_size = cache_size

    async def open(self) -> None:
        self._kv = await self.js.key_value(self.topology.workflows_bucket)

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("WorkflowStore.open() was not awaited")
        return self._kv

    @staticmethod
    def _key(wf_id: str) -> str:
        return f"wf.{wf_id}"

    # -- reading ---------------------------------------------------------------------
    async def load(self, wf_id: str, *, writer: bool = False) -> tuple[WorkflowRecord, int] | None:
        """The workflow's state and revision (the sequence of its last entry). A
        ``writer`` (who will append, so the fence checks what it read) takes this
        replica's copy when it has one; readers always rebuild from the stream."""
        if writer:
            cached = self._cache.pop(wf_id, None)
            if cached is not None:
                return cached
        rec = await self._snapshot(wf_id)
        tail = await self.entries_after(wf_id, rec.history_seq if rec is not None else 0)
        if rec is None:
            if not tail:
                return None
            rec = WorkflowRecord(id=wf_id)
        for msg in tail:
            self._apply(rec, msg)
        return rec, rec.history_seq

    async def starts_after(self, after: int, limit: int) -> list[StoredMsg]:
        """Up to ``limit`` first entries of workflows stored after history sequence
        ``after``, oldest first (retention's scan)."""
        return await read_batch(
            self.nc,
            self.topology.wf_events_stream,
            self.topology.wf_starts_subjects,
            after=after,
            limit=limit,
        )

    async def last_event(self, wf_id: str) -> events_pb2.WorkflowEvent | None:
        """The workflow's latest event (one direct get of its last entry)."""
        try:
            msg = await self.js.get_msg(
                self.topology.wf_events_stream,
                subject=self.topology.wf_history_subjects(wf_id),
                direct=True,
            )
        except NotFoundError:
            return None
        events = entry_events(msg.data or b"")
        return events[-1] if events else None

    async def remove(self, wf_id: str) -> None:
        """Purge the workflow's history and snapshot (retention.py)."""
        await self.js.purge_stream(
            self.topology.wf_events_stream, subject=self.topology.wf_history_subjects(wf_id)
        )
        with contextlib.suppress(KeyNotFoundError):
            await self.kv.purge(self._key(wf_id))
        self._cache.pop(wf_id, None)

    async def exists(self, wf_id: str) -> bool:
        """Whether the workflow was started (one get of its start entry; from the leader
        when the stream is replicated)."""
        try:
            await self.js.get_msg(
                self.topology.wf_events_stream,
                subject=self.topology.wf_start_subject(wf_id),
                direct=not self.replicated,
            )
        except NotFoundError:
            return False
        return True

    async def entries_after(self, wf_id: str, after: int) -> list[StoredMsg]:
        """The workflow's history entries stored after stream sequence ``after``: every
        one already acknowledged to its writer (read your writes, on any replica)."""
        stream, subject = self.topology.wf_events_stream, self.topology.wf_history_subjects(wf_id)
        stored = await read_batch(self.nc, stream, subject, after=after)
        if not self.replicated:
            return stored  # one replica: direct gets are the leader's answers
        # Replicated, a direct get may be answered by a follower that lags behind: the
        # leader says which entry is the last, and what the follower lacked is read from
        # it (one request, and one more per missing entry, rarely any).
        try:
            last = await self.js.get_msg(stream, subject=subject)
        except NotFoundError:
            return stored
        seen = stored[-1].seq if stored else after
        while seen < (last.seq or 0):
            msg = await self.js.get_msg(stream, seq=seen + 1, subject=subject, next=True)
            seen = msg.seq or last.seq or 0
            stored.append(StoredMsg(seen, msg.subject or subject, msg.data or b""))
        return stored

    async def _snapshot(self, wf_id: str) -> WorkflowRecord | None:
        try:
            entry = await self.kv.get(self._key(wf_id))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        rec = WorkflowRecord.model_validate_json(entry.value)
        rec._state_bytes = len(entry.value)
        return rec

    @staticmethod
    def _apply(rec: WorkflowRecord, msg: StoredMsg) -> None:
        for event in entry_events(msg.data):
            if event.sequence > rec.seq:  # an entry never repeats events; be safe anyway
                apply_event(rec, event)
        rec.history_seq = msg.seq
        rec._tail_bytes += len(msg.data)

    def checkin(self, rec: WorkflowRecord, revision: int) -> None:
        """Keep ``rec`` (saved at ``revision``, nothing unsaved) for this replica's next
        writer of it. Whoever changes it next takes it out with ``load(writer=True)``."""
        if rec.outbox or rec.terminal:
            return
        self._cache[rec.id] = (rec, revision)
        self._cache.move_to_end(rec.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def starts_before(self, before: int | None, limit: int) -> tuple[list[StoredMsg], bool]:
        """Up to ``limit`` first entries of workflows stored below history sequence
        ``before`` (None: the newest), oldest first, and whether older ones may remain:
        the listing index, read newest first in windows of the stream that grow until
        they hold a page, so a page costs a few requests however many workflows exist."""
        stream, subject = self.topology.wf_events_stream, self.topology.wf_starts_subjects
        if before is None:
            before = (await self.js.stream_info(stream)).state.last_seq + 1
        found: list[StoredMsg] = []
        width = max(64, limit * 8)
        top = before
        while top > 1 and len(found) < limit:
            low = max(0, top - width)
            window = [
                m
                for m in await read_batch(self.nc, stream, subject, after=low, until=top)
                if m.seq < top
            ]
            found = window + found
            top, width = low + 1, width * 2
        return found[-limit:], top > 1 or len(found) > limit

    async def ids(self) -> list[str]:
        """Every workflow id, from the server's subject index of the start subjects."""
        try:
            info = await self.js.stream_info(
                self.topology.wf_events_stream, subjects_filter=self.topology.wf_starts_subjects
            )
        except NotFoundError:
            return []
        return [subject.split(".")[-2] for subject in (info.state.subjects or {})]

    # -- writing ---------------------------------------------------------------------
    async def create(self, rec: WorkflowRecord) -> int:
        """Append the workflow's first entry; :class:`Conflict` if it already exists."""
        return await self._append(rec, 0, self.topology.wf_start_subject(rec.id))

    async def save(self, rec: WorkflowRecord, revision: int) -> int:
        """Append the events in ``rec.outbox`` as one entry, fenced on ``revision``;
        raises :class:`Conflict` when someone else appended since."""
        if not rec.outbox:
            return revision
        return await self._append(rec, revision, self.topology.wf_events_subject(rec.id))

    async def _append(self, rec: WorkflowRecord, revision: int, subject: str) -> int:
        events = list(rec.outbox)
        for event in events:
            if event.gate_opened.HasField("expire_time"):
                # Before the entry: an entry in the stream is never written again, so a
                # crash in between must not leave a gate without its timer.
                await self.schedule(
                    rec.id,
                    event.gate_opened.expire_time,
                    f"gate {event.gate_opened.gate_id} expires",
                    msg_id=f"{event.event_id}.timer",
                )
        data = events_pb2.WorkflowHistoryEntry(events=events).SerializeToString()
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(revision),
            "Nats-Expected-Last-Subject-Sequence-Subject": self.topology.wf_history_subjects(
                rec.id
            ),
        }
        try:
            ack = await self.js.publish(subject, data, headers=headers)
        except BadRequestError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                raise Conflict(rec.id) from exc
            raise
        rec.outbox.clear()
        rec.history_seq = ack.seq
        rec._tail_bytes += len(data)
        if rec._tail_bytes >= max(SNAPSHOT_MIN_BYTES, 2 * rec._state_bytes):
            await self._maybe_snapshot(rec)
        if self.on_published is not None:
            await self.on_published(events)  # waits while the audit backlog is full
        return ack.seq

    async def _maybe_snapshot(self, rec: WorkflowRecord) -> None:
        """Snapshot once the history since the last snapshot is at least twice the
        state: a rebuild then reads at most about three times the state, and the bytes
        written stay proportional to the history (a large value written once, like a big
        blackboard entry, is not written again). Best effort: a missing snapshot only
        makes the next rebuild read more."""
        value = rec.model_dump_json().encode()
        rec._state_bytes = len(value)
        if 2 * len(value) > rec._tail_bytes:
            return  # the history is still mostly the state itself: replaying it is cheap
        try:
            await self.kv.put(self._key(rec.id), value)
        except Exception as exc:
            log.warning("snapshot_not_written", workflow_id=rec.id, error=repr(exc))
            return
        rec._tail_bytes = 0

    # -- the work queue ----------------------------------------------------------------
    async def work_consumer(
        self, durable: str, kind: str, *, ack_wait_s: float
    ) -> JetStreamContext.PullSubscription:
        """Create or update the replicas' shared durable consumer of the ``kind`` work
        steps and bind to it: a changed ack wait must reach the existing consumer."""
        return await self._consumer(
            self.topology.work_stream, durable, self.topology.work_subject(kind), ack_wait_s
        )

    async def start_consumer(
        self, durable: str, *, ack_wait_s: float
    ) -> JetStreamContext.PullSubscription:
        """The replicas' shared durable consumer of first history entries: a new
        workflow's first step needs no work-queue message of its own, its start entry is
        one (held un-acked while it runs, like any step)."""
        return await self._consumer(
            self.topology.wf_events_stream, durable, self.topology.wf_starts_subjects, ack_wait_s
        )

    async def _consumer(
        self, stream: str, durable: str, subject: str, ack_wait_s: float
    ) -> JetStreamContext.PullSubscription:
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=-1,
            max_ack_pending=-1,
            filter_subject=subject,
        )
        await self.js.add_consumer(stream, config=config)
        return await self.js.pull_subscribe_bind(durable, stream=stream)

    async def schedule(
        self, wf_id: str, at: timestamp_pb2.Timestamp, reason: str, *, msg_id: str
    ) -> None:
        """Queue a timer step: "advance ``wf_id``" once ``at`` has passed
        (services/coordinator/timers.py holds it until then). ``msg_id`` makes a
        re-sent timer a duplicate."""
        step = events_pb2.WorkStep(workflow_id=wf_id, reason=reason, not_before=at)
        await self.js.publish(
            self.topology.work_subject(TIMER),
            step.SerializeToString(),
            headers=msg_id_headers(msg_id),
        )

    async def enqueue(self, wf_id: str, reason: str, *, within_s: float = 10.0) -> None:
        """Queue "advance ``wf_id``", retrying a NATS fault (a work-queue stream with no
        leader during an election) for up to ``within_s``; then the error propagates and
        the caller's retry repairs it (StartWorkflow and DecideGate re-queue on retry)."""
        step = events_pb2.WorkStep(workflow_id=wf_id, reason=reason)
        await retry_transient(
            lambda: self.js.publish(self.topology.work_subject(ADVANCE), step.SerializeToString()),
            within_s=within_s,
            what="enqueue",
        )
