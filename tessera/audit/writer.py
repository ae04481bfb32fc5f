"""Appending to one writer's hash chain on JetStream, with signed checkpoints.

Each writer (one service instance, e.g. ``policy-1a2b``) keeps its OWN chain on its own
subject (:meth:`Topology.audit_chain_subject`), so writers never contend for one head.
Within a chain, record ``n`` carries ``sequence = n`` and ``prev_hash`` = the ``hash`` of
record ``n - 1``; ``hash`` is SHA-256 over the record's deterministic protobuf
serialization with ``hash`` empty (:func:`~tessera.audit.records.record_hash`).

What a caller may rely on:

* :meth:`AuditWriter.append` returns only after JetStream acknowledged the record (stored
  with ``sync_interval: always``); on any failure it raises
  :class:`~tessera.runtime.errors.Unavailable` and the caller must not perform the action.
  A write, once begun, runs to its end even if its caller is cancelled (a gRPC client
  that went away): a publish cut short would leave the record's fate unknown and the
  writer's head stale.
* :meth:`AuditWriter.defer` queues a record that need not be stored before anything else
  happens (a tool call's outcome, after the call): it rides in the ``carried`` field of the
  chain's next record, or is written on its own within ``linger_s``. Such a record is lost
  if the process dies before then; never defer one that must precede an action.
* Two processes using the same writer name cannot fork a chain: every publish carries
  ``Nats-Expected-Last-Subject-Sequence``, so the loser is refused, re-reads the head and
  retries (bounded), continuing the chain linearly.
* With a ``signer``, the writer signs its chain head every ``checkpoint_every`` records
  (but not twice within ``checkpoint_min_interval_s``), every ``checkpoint_interval_s``
  seconds while the chain grows, and at :meth:`close`, and writes the signature as an
  ``AUDIT_KIND_CHECKPOINT`` record on the same chain. Signing never blocks :meth:`append`
  (the head is signed outside the chain's lock, and the checkpoint then names the position
  it signed); a failed signature is logged and tried again at the next trigger: records
  stay "not yet covered" meanwhile, never lost. The minimum interval keeps Vault's signing
  load per writer at one request a second however busy the chain is (a Transit request
  costs CPU on the same machines as the calls being audited); a busy chain is then
  covered in steps of one second's records instead of ``checkpoint_every``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import structlog
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from tessera.audit.records import receipt_for, to_struct
from tessera.audit.scrub import scrub
from tessera.audit.signing import Signer, checkpoint_payload
from tessera.runtime.bus import Topology, msg_id_headers
from tessera.runtime.errors import Unavailable
from tessera.v1 import audit_pb2

__all__ = ["AuditWriter"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

_WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence mismatch
_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_CHECKPOINT = audit_pb2.AUDIT_KIND_CHECKPOINT


def _is_wrong_last_sequence(exc: APIError) -> bool:
    return exc.err_code == _WRONG_LAST_SEQUENCE


@dataclass(frozen=True)
class _Head:
    sequence: int = 0
    hash: bytes = b""
    stream_sequence: int = 0
    covers: int = 0
    """When the record at the head is a checkpoint: the sequence it signs."""

    @property
    def signed(self) -> bool:
        """Everything up to this head is signed: it is a checkpoint of the record before."""
        return self.covers > 0 and self.covers == self.sequence - 1


def _head_of(record: audit_pb2.AuditRecord, stream_sequence: int) -> _Head:
    covers = record.checkpoint.covered_sequence if record.kind == _CHECKPOINT else 0
    return _Head(record.sequence, record.hash, stream_sequence, covers)


class AuditWriter:
    """Appends records to one writer's chain. ``start()`` before use, ``close()`` at the end.

    ``writer`` names the chain (one per service instance, a valid subject token, starting
    with the identity's name so its signing key owns it: ``policy-1a2b``);
    ``actor`` is the identity recorded in every record (e.g. ``policy``). ``signer``
    (or :meth:`attach_signer` later) turns checkpoints on.
    """

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        writer: str,
        actor: str,
        publish_timeout_s: float = 2.0,
        max_attempts: int = 3,
        linger_s: float = 0.05,
        max_carried: int = 64,
        signer: Signer | None = None,
        checkpoint_every: int = 100,
        checkpoint_interval_s: float = 5.0,
        checkpoint_min_interval_s: float = 1.0,
        sign_timeout_s: float = 5.0,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_interval_s <= 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval_s > 0")
        if not 0 <= checkpoint_min_interval_s <= checkpoint_interval_s:
            raise ValueError("checkpoint_min_interval_s must be in [0, checkpoint_interval_s]")
        self._js = js
        self._topology = topology
        self.writer = writer
        self.actor = actor
        self.subject = topology.audit_chain_subject(writer, owner=actor)
        self._timeout = publish_timeout_s
        self._max_attempts = max_attempts
        self._lock = asyncio.Lock()
        self._head: _Head | None = None
        self._linger_s = linger_s
        self._max_carried = max_carried
        self._deferred: list[audit_pb2.AuditRecord] = []
        self._oldest = 0.0
        """When the oldest record still deferred was deferred (monotonic)."""
        self._flusher: asyncio.Task[None] | None = None
        self._failed = False
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval_s = checkpoint_interval_s
        self._checkpoint_min_interval_s = checkpoint_min_interval_s
        self._signed_at = -float("inf")
        """When the last signature was requested (monotonic)."""
        self._sign_timeout_s = sign_timeout_s
        self._checkpoint_lock = asyncio.Lock()
        self._last_checkpoint = 0
        """Chain sequence of the last checkpoint record written or recovered."""
        self._covered = 0
        """Chain sequence the last checkpoint signed."""
        self._since_checkpoint = 0
        self._checkpointer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._started = False

    @property
    def failing(self) -> bool:
        """Deferred records wait because the last write failed (the linger retries)."""
        return self._failed and bool(self._deferred)

    @property
    def deferred(self) -> int:
        """Records deferred and not yet written (those riding in a write under way are not
        counted: at most :attr:`max_carried` more)."""
        return len(self._deferred)

    @property
    def max_carried(self) -> int:
        """How many deferred records one write carries."""
        return self._max_carried

    @property
    def head_sequence(self) -> int:
        """Chain sequence of the last record written or recovered (0: empty chain)."""
        return self._head.sequence if self._head is not None else 0

    @property
    def last_checkpoint(self) -> int:
        """Chain sequence of the last checkpoint record this writer wrote or recovered."""
        return self._last_checkpoint

    def receipt(self, record: audit_pb2.AuditRecord) -> audit_pb2.AuditReceipt:
        """The receipt of a record :meth:`append` returned."""
        return receipt_for(self.writer, record)

    async def start(self) -> None:
        """Recover the chain head from the stream, so a restarted writer continues it."""
        async with self._lock:
            self._head = await self._read_head()
            if self._head.covers:
                self._last_checkpoint = self._head.sequence
                self._covered = self._head.covers
        self._started = True
        self._start_ticker()
        log.info("audit_writer_started", writer=self.writer, head=self._head.sequence)

    def attach_signer(self, signer: Signer) -> None:
        """Start signing checkpoints with ``signer`` (for a service that logs in to Vault
        after its audit writer started). Replaces a previous signer."""
        self._signer = signer
        self._start_ticker()

    def _start_ticker(self) -> None:
        if self._started and self._signer is not None and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name=f"audit-checkpoint:{self.writer}")

    async def _last_in_chain(self) -> RawStreamMsg:
        stream = self._topology.audit_stream
        try:
            # A direct get by subject: the one read of the audit stream a writer's NATS
            # permissions allow (its own chains; tessera.runtime.nats_permissions).
            return await self._js.get_last_msg(stream, self.subject, direct=True)
        except nats.errors.NoRespondersError:
            # A stream declared before it answered direct gets (the operator's next
            # `declare` turns them on): ask its leader, as writers used to.
            return await self._js.get_last_msg(stream, self.subject)

    async def _read_head(self) -> _Head:
        try:
            msg = await self._last_in_chain()
        except NotFoundError:
            return _Head()
        except (APIError, nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(
                "audit stream unreachable", reason="AUDIT_UNAVAILABLE", retry_after_s=1.0
            ) from exc
        record = audit_pb2.AuditRecord()
        try:
            record.ParseFromString(msg.data or b"")
        except DecodeError as exc:
            # Never continue a chain from a head we cannot read: an operator must look.
            raise Unavailable(
                f"audit chain {self.writer}: last record (stream seq {msg.seq}) is unreadable",
                reason="AUDIT_CHAIN_CORRUPT",
            ) from exc
        return _head_of(record, msg.seq or 0)

    async def append(
        self,
        kind: audit_pb2.AuditKind.ValueType,
        *,
        workflow_id: str = "",
        task_id: str = "",
        outcome: str = "",
        resource: str = "",
        decision_id: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> audit_pb2.AuditRecord:
        """Write one record and wait for JetStream's ack; the stored record (carrying the
        records deferred until then).

        Raises :class:`Unavailable` (reason ``AUDIT_UNAVAILABLE``) when it cannot be
        written; the caller must then not perform the audited action.
        """
        body = self._body(kind, workflow_id, task_id, outcome, resource, decision_id, details)
        return await _uncancellable(self._locked_write(body))

    async def _locked_write(self, body: audit_pb2.AuditRecord) -> audit_pb2.AuditRecord:
        async with self._lock:
            return await self._write(body)

    def defer(
        self,
        kind: audit_pb2.AuditKind.ValueType,
        *,
        workflow_id: str = "",
        task_id: str = "",
        outcome: str = "",
        resource: str = "",
        decision_id: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue a record for the chain's next write, or its own within ``linger_s``.

        Only for records nothing waits on (see the module docstring). Failures surface in
        the log and at the next :meth:`append` or :meth:`flush`, which carry the records
        still deferred. Callers bound their backlog with :attr:`deferred` and :meth:`flush`.
        """
        body = self._body(kind, workflow_id, task_id, outcome, resource, decision_id, details)
        body.record_id = str(uuid.uuid4())
        body.time.GetCurrentTime()
        if not self._deferred:
            self._oldest = time.monotonic()
        self._deferred.append(body)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later(self._linger_s))

    async def flush(self) -> None:
        """Write every deferred record now (they ride on the last one). Raises
        :class:`Unavailable` when they cannot be written; they stay deferred."""
        await _uncancellable(self._flush())

    async def _flush(self) -> None:
        async with self._lock:
            while self._deferred:
                # The oldest records ride on the last one of their batch, in order.
                last = min(len(self._deferred), self._max_carried + 1) - 1
                carrier = self._deferred.pop(last)
                try:
                    await self._write(carrier)
                except BaseException:
                    self._deferred.insert(last, carrier)
                    raise

    async def checkpoint(self) -> audit_pb2.AuditRecord | None:
        """Sign the current chain head and write the checkpoint record; ``None`` when there
        is no signer or nothing new to sign.

        Raises :class:`Unavailable` (reason ``AUDIT_CHECKPOINT_FAILED``) when the head
        could not be signed or the checkpoint not stored (the records stay uncovered until
        the next checkpoint)."""
        signer = self._signer
        if signer is None:
            return None
        async with self._checkpoint_lock:
            head = self._head
            if head is None or not self._needs_checkpoint(head):
                return None
            counted = self._since_checkpoint
            payload = checkpoint_payload(self.writer, head.sequence, head.hash)
            self._signed_at = time.monotonic()
            try:
                signed = await asyncio.wait_for(signer.sign(payload), self._sign_timeout_s)
            except Exception as exc:
                # Never the payload or the signer's error text: Vault errors can echo input.
                log.warning(
                    "audit_checkpoint_unsigned", writer=self.writer, error=type(exc).__name__
                )
                raise Unavailable(
                    "audit checkpoint could not be signed",
                    reason="AUDIT_CHECKPOINT_FAILED",
                    retry_after_s=1.0,
                ) from exc
            body = self._body(_CHECKPOINT, "", "", "signed", signed.key_name, "", None)
            body.checkpoint.CopyFrom(
                audit_pb2.AuditCheckpoint(
                    covered_sequence=head.sequence,
                    covered_hash=head.hash,
                    key_name=signed.key_name,
                    key_version=signed.key_version,
                    algorithm=signed.algorithm,
                    signature=signed.signature,
                )
            )
            async with self._lock:
                try:
                    # Carrying nothing: what it stores must be what it signs before it.
                    stored = await self._write(body, carry=False)
                except Unavailable as exc:
                    raise Unavailable(
                        "audit checkpoint could not be stored",
                        reason="AUDIT_CHECKPOINT_FAILED",
                        retry_after_s=1.0,
                    ) from exc
            self._last_checkpoint = stored.sequence
            self._covered = max(self._covered, head.sequence)
            self._since_checkpoint = max(0, self._since_checkpoint - counted)
            log.debug(
                "audit_checkpoint_written",
                writer=self.writer,
                covered=head.sequence,
                key_version=signed.key_version,
            )
            return stored

    async def close(self) -> None:
        """Write what is deferred (raises :class:`Unavailable` if it cannot be), sign a
        last checkpoint (logged if it cannot be: the records stay uncovered), and stop the
        timers."""
        try:
            await self.flush()
            try:
                await self.checkpoint()
            except Unavailable:
                log.error("audit_final_checkpoint_failed", writer=self.writer)
        finally:
            for task in (self._flusher, self._ticker, self._checkpointer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._flusher = self._ticker = self._checkpointer = None
            self._started = False

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_interval_s)
            if self._head is not None and self._needs_checkpoint(self._head):
                await self._checkpoint_logged()

    async def _checkpoint_logged(self) -> None:
        try:
            await self.checkpoint()
        except Unavailable:
            pass  # logged by checkpoint()/_store; the next trigger tries again
        except Exception as exc:
            log.error("audit_checkpoint_failed", writer=self.writer, error=type(exc).__name__)

    def _needs_checkpoint(self, head: _Head) -> bool:
        """Some record up to ``head`` is not signed yet."""
        return head.sequence > self._covered and not head.signed

    def _after_write(self, stored: audit_pb2.AuditRecord) -> None:
        if stored.kind == _CHECKPOINT or self._signer is None:
            return
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._checkpoint_every and (
            self._checkpointer is None or self._checkpointer.done()
        ):
            wait_s = self._signed_at + self._checkpoint_min_interval_s - time.monotonic()
            self._checkpointer = asyncio.create_task(
                self._checkpoint_after(wait_s), name=f"audit-checkpoint-count:{self.writer}"
            )

    async def _checkpoint_after(self, wait_s: float) -> None:
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        await self._checkpoint_logged()

    async def _flush_later(self, delay_s: float) -> None:
        retry_s = self._linger_s
        try:
            await asyncio.sleep(delay_s)
            # Under load the records deferred by then rode on other records already.
            waited = time.monotonic() - self._oldest
            if self._deferred and waited >= self._linger_s:
                await self.flush()
            elif self._deferred:
                retry_s = self._linger_s - waited
        except Exception as exc:  # the records stay deferred; try again later
            if not isinstance(exc, Unavailable):  # (Unavailable is logged by _store)
                log.error("audit_deferred_flush_failed", writer=self.writer, error=repr(exc))
            retry_s = max(self._linger_s, 1.0)
        except asyncio.CancelledError:
            self._flusher = None  # close(): no new timer
            raise
        self._flusher = None
        if self._deferred:
            self._flusher = asyncio.create_task(self._flush_later(retry_s))

    def _body(
        self,
        kind: audit_pb2.AuditKind.ValueType,
        workflow_id: str,
        task_id: str,
        outcome: str,
        resource: str,
        decision_id: str,
        details: Mapping[str, Any] | None,
    ) -> audit_pb2.AuditRecord:
        body = audit_pb2.AuditRecord(
            kind=kind,
            actor=self.actor,
            workflow_id=workflow_id,
            task_id=task_id,
            outcome=outcome,
            resource=resource,
            decision_id=decision_id,
        )
        if details:
            body.details.CopyFrom(to_struct(scrub(details)))
        return body

    async def _write(
        self, body: audit_pb2.AuditRecord, *, carry: bool = True
    ) -> audit_pb2.AuditRecord:
        """Chain ``body`` (with up to ``max_carried`` deferred records unless ``carry`` is
        false) and store it; the lock is held. On failure the carried records are deferred
        again."""
        carried = self._deferred[: self._max_carried] if carry else []
        del self._deferred[: len(carried)]
        try:
            stored = await self._store(body, carried)
        except BaseException:
            self._deferred[:0] = carried
            self._failed = True
            raise
        self._failed = False
        self._after_write(stored)
        return stored

    async def _store(
        self, body: audit_pb2.AuditRecord, carried: Sequence[audit_pb2.AuditRecord]
    ) -> audit_pb2.AuditRecord:
        last_exc: BaseException | None = None
        for _attempt in range(self._max_attempts):
            if self._head is None:
                try:
                    self._head = await self._read_head()
                except Unavailable as exc:
                    last_exc = exc
                    continue
            record = self._chain(body, self._head, carried)
            try:
                ack = await self._js.publish(
                    self.subject,
                    record.SerializeToString(deterministic=True),
                    timeout=self._timeout,
                    stream=self._topology.audit_stream,
                    headers=msg_id_headers(
                        record.record_id,
                        {_EXPECTED_LAST_SUBJECT_SEQ: str(self._head.stream_sequence)},
                    ),
                )
            except APIError as exc:
                last_exc = exc
                # Another process wrote to this chain (or our head is stale): re-read
                # the head and retry, continuing the chain instead of forking it.
                self._head = None
                if _is_wrong_last_sequence(exc):
                    log.warning("audit_chain_head_moved", writer=self.writer)
                    continue
                break
            except (nats.errors.Error, TimeoutError) as exc:
                # Outcome unknown (the record may be stored; its carried records then
                # appear twice, with the same record_id): re-sync before the next.
                last_exc = exc
                self._head = None
                break
            except asyncio.CancelledError:
                self._head = None  # the same unknown outcome (close() cancelling a write)
                raise
            self._head = _head_of(record, ack.seq)
            return record
        log.error("audit_write_failed", writer=self.writer, error=repr(last_exc))
        raise Unavailable(
            "audit record could not be written", reason="AUDIT_UNAVAILABLE", retry_after_s=1.0
        ) from last_exc

    @staticmethod
    def _chain(
        body: audit_pb2.AuditRecord,
        head: _Head,
        carried: Sequence[audit_pb2.AuditRecord] = (),
    ) -> audit_pb2.AuditRecord:
        record = audit_pb2.AuditRecord()
        record.CopyFrom(body)
        if not record.record_id:  # a deferred record keeps the id and time it was given
            record.record_id = str(uuid.uuid4())
            record.time.GetCurrentTime()
        record.carried.extend(carried)
        record.sequence = head.sequence + 1
        record.prev_hash = head.hash
        # == record_hash(record): ``hash`` is still empty, so no copy is needed.
        record.hash = hashlib.sha256(record.SerializeToString(deterministic=True)).digest()
        return record


async def _uncancellable(work: Coroutine[Any, Any, T]) -> T:
    """``await work`` as a task of its own that a cancelled caller leaves running to its
    end (its failure, if any, was logged by ``_store``)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: asyncio would otherwise warn that nobody did
