"""Hash-chained audit records on JetStream: write, verify, tail.

Each writer (one service instance, e.g. ``policy-1a2b``) keeps its OWN chain on its own
subject (:meth:`Topology.audit_chain_subject`), so writers never contend for one head.
Within a chain, record ``n`` carries ``sequence = n`` and ``prev_hash`` = the ``hash`` of
record ``n - 1``; ``hash`` is SHA-256 over the record's deterministic protobuf
serialization with ``hash`` empty (:func:`record_hash`).

What a caller may rely on:

* :meth:`AuditWriter.append` returns only after JetStream acknowledged the record (stored
  with ``sync_interval: always``); on any failure it raises
  :class:`~tessera.runtime.errors.Unavailable` and the caller must not perform the action.
* :meth:`AuditWriter.defer` queues a record that need not be stored before anything else
  happens (a tool call's outcome, after the call): it rides in the ``carried`` field of the
  chain's next record, or is written on its own within ``linger_s``. Such a record is lost
  if the process dies before then; never defer one that must precede an action.
* Two processes using the same writer name cannot fork a chain: every publish carries
  ``Nats-Expected-Last-Subject-Sequence``, so the loser is refused, re-reads the head and
  retries (bounded), continuing the chain linearly.
* ``details`` never carries secrets: :func:`scrub` redacts credential-like keys and
  Vault-token-like values; keep a secret-bearing argument comparable with
  :func:`hmac_digest` instead.
* :func:`verify` names every modified, missing, reordered, duplicated or unlinked record,
  and every deleted stream message, with its stream sequence.

Limits: the chain proves integrity against anyone who cannot rewrite the whole suffix of a
chain. Someone with write access to the stream can forge a *new* tail record with a correct
hash (SHA-256 is unkeyed); deleting the *last* record of a chain shows only as a deleted
stream sequence. External anchoring of chain heads (or signed records) closes both.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import nats.errors
import structlog
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from tessera.runtime.bus import Topology, msg_id_headers
from tessera.runtime.errors import Unavailable
from tessera.runtime.logging import REDACTED, is_sensitive_key
from tessera.v1 import audit_pb2

__all__ = [
    "HMAC_PREFIX",
    "AuditEntry",
    "AuditWriter",
    "ChainReport",
    "Issue",
    "IssueKind",
    "VerifyReport",
    "hmac_digest",
    "is_sensitive_key",
    "record_hash",
    "scrub",
    "tail",
    "verify",
]

log = structlog.get_logger(__name__)

HMAC_PREFIX = "hmac-sha256:"
_WRONG_LAST_SEQUENCE = 10071  # JetStream: Nats-Expected-Last-Subject-Sequence mismatch
_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# Beyond tessera.runtime.logging's rule (token, secret, password, authorization, …):
# names that carry credentials without one of those words.
# Compared with separators removed, so `X-Api-Key`, `api_key` and `apiKey` all match.
# Values that are credentials whatever their key: Vault/OpenBao tokens, bearer headers,
# PEM private keys.
_SECRET_VALUE = re.compile(
    r"^(?:hv[sbr]\.[A-Za-z0-9_-]{16,}|[sbr]\.[A-Za-z0-9]{20,}|bearer\s+\S+)$|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    re.IGNORECASE,
)
_KIND_NAMES = {v.number: v.name for v in audit_pb2.AuditKind.DESCRIPTOR.values}


def hmac_digest(key: bytes, value: str) -> str:
    """``hmac-sha256:<hex>`` of ``value``: lets an auditor compare a secret-bearing argument
    against a known value without the record revealing it. Kept as-is by :func:`scrub`."""
    if not key:
        raise ValueError("hmac_digest needs a non-empty key")
    return HMAC_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and value.startswith(HMAC_PREFIX)


@functools.lru_cache(maxsize=4096)
def _sensitive_str_key(key: str) -> bool:
    return is_sensitive_key(key)


def _sensitive(key: object) -> bool:
    # Records reuse a handful of keys: memoize the rule (a pure function of the key) for
    # short keys only, so argument names chosen by callers cannot grow the cache's memory.
    if type(key) is str and len(key) <= 64:
        return _sensitive_str_key(key)
    return is_sensitive_key(key)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): (v if _is_digest(v) else REDACTED) if _sensitive(k) else _scrub_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    if isinstance(value, str) and _SECRET_VALUE.search(value):
        return REDACTED
    return value


def scrub(details: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``details`` safe to write: at any depth, values of credential-like keys
    become ``"[redacted]"`` (unless already an :func:`hmac_digest`), and token-like string
    values are redacted whatever their key."""
    scrubbed: dict[str, Any] = _scrub_value(details)
    return scrubbed


def record_hash(record: audit_pb2.AuditRecord) -> bytes:
    """SHA-256 over ``record``'s deterministic serialization with ``hash`` empty."""
    unhashed = audit_pb2.AuditRecord()
    unhashed.CopyFrom(record)
    unhashed.ClearField("hash")
    return hashlib.sha256(unhashed.SerializeToString(deterministic=True)).digest()


def _is_wrong_last_sequence(exc: APIError) -> bool:
    return exc.err_code == _WRONG_LAST_SEQUENCE


@dataclass
class _Head:
    sequence: int = 0
    hash: bytes = b""
    stream_sequence: int = 0


class AuditWriter:
    """Appends records to one writer's chain. ``start()`` before use.

    ``writer`` names the chain (one per service instance, a valid subject token);
    ``actor`` is the identity recorded in every record (e.g. ``policy``).
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
    ) -> None:
        self._js = js
        self._topology = topology
        self.writer = writer
        self.actor = actor
        self.subject = topology.audit_chain_subject(writer)
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

    @property
    def failing(self) -> bool:
        """Deferred records wait because the last write failed (the linger retries)."""
        return self._failed and bool(self._deferred)

    @property
    def deferred(self) -> int:
        """Records deferred and not yet written."""
        return len(self._deferred)

    @property
    def head_sequence(self) -> int:
        """Chain sequence of the last record written or recovered (0: empty chain)."""
        return self._head.sequence if self._head is not None else 0

    async def start(self) -> None:
        """Recover the chain head from the stream, so a restarted writer continues it."""
        async with self._lock:
            self._head = await self._read_head()
        log.info("audit_writer_started", writer=self.writer, head=self._head.sequence)

    async def _read_head(self) -> _Head:
        try:
            msg = await self._js.get_last_msg(self._topology.audit_stream, self.subject)
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
        return _Head(record.sequence, record.hash, msg.seq or 0)

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

    async def close(self) -> None:
        """Write what is deferred (raises :class:`Unavailable` if it cannot be) and stop
        the linger timer."""
        try:
            await self.flush()
        finally:
            if self._flusher is not None:
                self._flusher.cancel()
                self._flusher = None

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
            body.details.CopyFrom(_to_struct(scrub(details)))
        return body

    async def _write(self, body: audit_pb2.AuditRecord) -> audit_pb2.AuditRecord:
        """Chain ``body`` (with up to ``max_carried`` deferred records) and store it; the
        lock is held. On failure the carried records are deferred again."""
        carried = self._deferred[: self._max_carried]
        del self._deferred[: len(carried)]
        try:
            stored = await self._store(body, carried)
        except BaseException:
            self._deferred[:0] = carried
            self._failed = True
            raise
        self._failed = False
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
            self._head = _Head(record.sequence, record.hash, ack.seq)
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


def _to_struct(details: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(details)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit details must be JSON-like: {exc}") from exc
    return struct


# -- reading -------------------------------------------------------------------------------

IssueKind = Literal[
    "modified", "missing", "reordered", "broken_link", "duplicate", "malformed", "deleted"
]


@dataclass(frozen=True)
class Issue:
    """One integrity finding. ``sequence`` is the chain position (0 when unknown),
    ``stream_sequence`` the JetStream sequence to look at (first of a range for
    ``missing``/``deleted``)."""

    kind: IssueKind
    writer: str
    sequence: int
    stream_sequence: int
    detail: str

    def __str__(self) -> str:
        where = f"chain {self.writer} seq {self.sequence}" if self.writer else "stream"
        return f"{self.kind}: {where} (stream seq {self.stream_sequence}): {self.detail}"


@dataclass(frozen=True)
class ChainReport:
    writer: str
    records: int
    """Stored records (each carries its ``carried`` ones)."""
    head_sequence: int
    issues: tuple[Issue, ...] = ()
    carried: int = 0
    """Records stored inside others' ``carried`` field."""

    @property
    def ok(self) -> bool:
        return not self.issues


@dataclass(frozen=True)
class VerifyReport:
    chains: tuple[ChainReport, ...]
    stream_issues: tuple[Issue, ...] = ()
    """Findings not tied to one chain (deleted stream messages)."""

    @property
    def issues(self) -> tuple[Issue, ...]:
        return (*self.stream_issues, *(i for c in self.chains for i in c.issues))

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def records(self) -> int:
        return sum(c.records for c in self.chains)

    @property
    def carried(self) -> int:
        return sum(c.carried for c in self.chains)


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


def kind_name(kind: int) -> str:
    """``AUDIT_KIND_POLICY_DECISION`` → ``policy_decision``."""
    return _KIND_NAMES.get(kind, str(kind)).removeprefix("AUDIT_KIND_").lower()


async def _entries(
    js: JetStreamContext,
    topology: Topology,
    *,
    start_seq: int,
    stop_seq: int | None,
    idle_timeout_s: float = 5.0,
) -> AsyncIterator[AuditEntry]:
    """Stored entries from ``start_seq`` in stream order; stops after ``stop_seq``
    (``None``: never). Raises Unavailable when the stream stops answering."""
    prefix = topology.audit_subjects.removesuffix(">")
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
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout_s if stop_seq is not None else 3600)
            except nats.errors.TimeoutError:
                if stop_seq is None:
                    continue
                raise Unavailable("audit stream stopped answering") from None
            seq = msg.metadata.sequence.stream
            record: audit_pb2.AuditRecord | None = audit_pb2.AuditRecord()
            try:
                record.ParseFromString(msg.data)  # type: ignore[union-attr]
            except DecodeError:
                record = None
            yield AuditEntry(seq, msg.subject.removeprefix(prefix), record)
            # Deleted messages never arrive: also stop when nothing is pending any more.
            if stop_seq is not None and (seq >= stop_seq or msg.metadata.num_pending == 0):
                return
    finally:
        await sub.unsubscribe()


async def _stream_bounds(js: JetStreamContext, topology: Topology) -> tuple[int, int, int]:
    info = await js.stream_info(topology.audit_stream)
    state = info.state
    return state.first_seq, state.last_seq, state.messages


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _check_chain(writer: str, entries: Sequence[AuditEntry]) -> ChainReport:
    issues: list[Issue] = []
    by_seq: dict[int, AuditEntry] = {}
    max_seen = 0
    for entry in entries:
        record = entry.record
        if record is None or record.sequence < 1:
            issues.append(
                Issue("malformed", writer, 0, entry.stream_sequence, "not an audit record")
            )
            continue
        seq = record.sequence
        if record_hash(record) != record.hash:
            issues.append(
                Issue("modified", writer, seq, entry.stream_sequence, "hash does not match content")
            )
        if seq in by_seq:
            issues.append(
                Issue(
                    "duplicate",
                    writer,
                    seq,
                    entry.stream_sequence,
                    f"sequence already stored at stream seq {by_seq[seq].stream_sequence}",
                )
            )
            continue
        if seq < max_seen:
            issues.append(
                Issue(
                    "reordered",
                    writer,
                    seq,
                    entry.stream_sequence,
                    f"stored after sequence {max_seen}",
                )
            )
        by_seq[seq] = entry
        max_seen = max(max_seen, seq)
    for seq, entry in sorted(by_seq.items()):
        record = entry.record
        assert record is not None
        if seq == 1:
            if record.prev_hash:
                issues.append(
                    Issue(
                        "broken_link",
                        writer,
                        1,
                        entry.stream_sequence,
                        "first record has a prev_hash",
                    )
                )
            continue
        prev = by_seq.get(seq - 1)
        if prev is not None and prev.record is not None and record.prev_hash != prev.record.hash:
            issues.append(
                Issue(
                    "broken_link",
                    writer,
                    seq,
                    entry.stream_sequence,
                    f"prev_hash does not match the hash of sequence {seq - 1}",
                )
            )
    missing = [s for s in range(1, max_seen + 1) if s not in by_seq]
    for first, last in _ranges(missing):
        after = by_seq.get(last + 1)
        issues.append(
            Issue(
                "missing",
                writer,
                first,
                after.stream_sequence if after is not None else 0,
                f"sequence {first}" if first == last else f"sequences {first}-{last}",
            )
        )
    issues.sort(key=lambda i: (i.sequence, i.stream_sequence))
    carried = sum(len(e.record.carried) for e in entries if e.record is not None)
    return ChainReport(writer, len(entries), max_seen, tuple(issues), carried)


async def verify(js: JetStreamContext, topology: Topology) -> VerifyReport:
    """Read every chain of the audit stream and report what does not verify.

    Raises :class:`Unavailable` when the stream cannot be read.
    """
    try:
        first, last, count = await _stream_bounds(js, topology)
    except NotFoundError:
        return VerifyReport(chains=())
    except (APIError, nats.errors.Error, TimeoutError) as exc:
        raise Unavailable("audit stream unreachable", reason="AUDIT_UNAVAILABLE") from exc
    chains: dict[str, list[AuditEntry]] = {}
    stream_seqs: list[int] = []
    if count:
        try:
            async for entry in _entries(js, topology, start_seq=first, stop_seq=last):
                chains.setdefault(entry.writer, []).append(entry)
                stream_seqs.append(entry.stream_sequence)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable("audit stream unreachable", reason="AUDIT_UNAVAILABLE") from exc
    stream_issues: list[Issue] = []
    present = set(stream_seqs)
    deleted = [s for s in range(1, last + 1) if s not in present]
    for lo, hi in _ranges(deleted):
        span = f"stream seq {lo}" if lo == hi else f"stream seqs {lo}-{hi}"
        stream_issues.append(Issue("deleted", "", 0, lo, f"{span} deleted or purged"))
    reports = tuple(_check_chain(w, entries) for w, entries in sorted(chains.items()))
    return VerifyReport(chains=reports, stream_issues=tuple(stream_issues))


async def tail(
    js: JetStreamContext, topology: Topology, *, follow: bool = False, n: int = 20
) -> AsyncIterator[AuditEntry]:
    """The last ``n`` stored records of all chains in stream order; with ``follow``, then
    every new record as it is stored (until the caller stops iterating). The records a
    stored record carries are listed on their own, just before it."""
    try:
        first, last, count = await _stream_bounds(js, topology)
    except NotFoundError:
        return
    if not count and not follow:
        return
    start = max(first, last - max(n, 0) + 1) if count else last + 1
    if not follow and start > last:
        return
    async for entry in _entries(js, topology, start_seq=start, stop_seq=None if follow else last):
        if entry.record is not None:
            for carried in entry.record.carried:
                yield AuditEntry(
                    entry.stream_sequence, entry.writer, carried, entry.record.sequence
                )
        yield entry


def to_timestamp_str(ts: timestamp_pb2.Timestamp) -> str:
    """RFC 3339 UTC with millisecond precision, for humans."""
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
