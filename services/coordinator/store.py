"""Workflow persistence on JetStream: KV snapshots with compare-and-set, the per-workflow
event subject, request-id claims, and the work queue.

Write order (a transactional outbox): the snapshot, holding its new events in `outbox`,
is written with compare-and-set on the KV revision first; then the events are published
with `Nats-Msg-Id` = `<workflow>.<sequence>`. A crash between the two leaves the events in
the snapshot; whoever loads it next publishes the ones the stream lacks. Two replicas can
never both advance a workflow: the loser's compare-and-set fails and it backs off.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable

import structlog
from google.protobuf import timestamp_pb2
from nats.js import JetStreamContext, api
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from services.coordinator.state import WorkflowRecord
from tessera.runtime.bus import Topology, msg_id_headers
from tessera.runtime.retry import retry_transient
from tessera.v1 import events_pb2

log = structlog.get_logger(__name__)

ADVANCE = "advance"
"""Work subject kind of "advance this workflow now" steps (the runner consumes them)."""
TIMER = "timer"
"""Work subject kind of timer steps, held until their ``not_before`` (timers.py)."""


class Conflict(Exception):
    """Another writer advanced the workflow first; this step's view is stale."""


class WorkflowStore:
    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        on_published: Callable[[list[events_pb2.WorkflowEvent]], Awaitable[None]] | None = None,
    ) -> None:
        self.js = js
        self.topology = topology
        self.on_published = on_published
        """Told of every event once it is in the stream (the audit trail listens)."""
        self._kv: KeyValue | None = None

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

    @staticmethod
    def _claim_key(request_id: str) -> str:
        return "req." + hashlib.sha256(request_id.encode()).hexdigest()[:40]

    async def load(self, wf_id: str, *, repair: bool = True) -> tuple[WorkflowRecord, int] | None:
        """The snapshot and its revision. `repair` publishes outbox events the stream
        lacks (writers need it; read-only callers skip the extra request)."""
        try:
            entry = await self.kv.get(self._key(wf_id))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        rec = WorkflowRecord.model_validate_json(entry.value)
        if repair and rec.outbox:
            await self._publish_missing(rec)
        return rec, entry.revision

    async def create(self, rec: WorkflowRecord) -> int:
        revision = await self.kv.create(self._key(rec.id), rec.model_dump_json().encode())
        await self.publish(rec)
        return revision

    async def save(self, rec: WorkflowRecord, revision: int) -> int:
        """Compare-and-set; raises Conflict when someone else wrote since `revision`."""
        try:
            new_revision = await self.kv.update(
                self._key(rec.id), rec.model_dump_json().encode(), last=revision
            )
        except KeyWrongLastSequenceError as exc:
            raise Conflict(rec.id) from exc
        await self.publish(rec)
        return new_revision

    async def publish(self, rec: WorkflowRecord) -> None:
        """Publish the snapshot's outbox (idempotent thanks to Nats-Msg-Id) and empty it
        in memory; the next save persists the emptied outbox."""
        subject = self.topology.wf_events_subject(rec.id)
        published = []
        for encoded in rec.outbox:
            raw = base64.b64decode(encoded)
            event = events_pb2.WorkflowEvent.FromString(raw)
            if event.gate_opened.HasField("expire_time"):
                # Before the event: an event in the stream is never republished, so a
                # crash in between must not leave a gate without its timer.
                await self.schedule(
                    rec.id,
                    event.gate_opened.expire_time,
                    f"gate {event.gate_opened.gate_id} expires",
                    msg_id=f"{event.event_id}.timer",
                )
            await self.js.publish(subject, raw, headers=msg_id_headers(event.event_id))
            published.append(event)
        rec.outbox.clear()
        if self.on_published is not None and published:
            await self.on_published(published)  # waits while the audit backlog is full

    async def _publish_missing(self, rec: WorkflowRecord) -> None:
        subject = self.topology.wf_events_subject(rec.id)
        try:
            last = await self.js.get_last_msg(self.topology.wf_events_stream, subject)
            published = events_pb2.WorkflowEvent.FromString(last.data or b"").sequence
        except NotFoundError:
            published = 0
        pending = [
            e
            for e in rec.outbox
            if events_pb2.WorkflowEvent.FromString(base64.b64decode(e)).sequence > published
        ]
        rec.outbox = pending
        if pending:
            log.info("outbox_republished", workflow_id=rec.id, events=len(pending))
            await self.publish(rec)

    async def claim(self, request_id: str, wf_id: str) -> str:
        """Bind `request_id` to `wf_id`, or return the workflow it was bound to before."""
        key = self._claim_key(request_id)
        try:
            await self.kv.create(key, wf_id.encode())
            return wf_id
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
            return (entry.value or b"").decode()

    async def ids(self) -> list[str]:
        """Every workflow id, from the server's subject index of the bucket's stream: a
        consistent snapshot (a KV key watcher can miss keys written while it runs)."""
        bucket = self.topology.workflows_bucket
        prefix = f"$KV.{bucket}.wf."
        try:
            info = await self.js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
        except NotFoundError:
            return []
        return [subject[len(prefix) :] for subject in (info.state.subjects or {})]

    async def work_consumer(
        self, durable: str, kind: str, *, ack_wait_s: float
    ) -> JetStreamContext.PullSubscription:
        """Create or update the replicas' shared durable consumer of the ``kind`` work
        steps and bind to it: a changed ack wait must reach the existing consumer."""
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_deliver=-1,
            max_ack_pending=-1,
            filter_subject=self.topology.work_subject(kind),
        )
        await self.js.add_consumer(self.topology.work_stream, config=config)
        return await self.js.pull_subscribe_bind(durable, stream=self.topology.work_stream)

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
