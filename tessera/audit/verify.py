"""Verifying chains: hashes, links and gaps, and checkpoint signatures.

:func:`verify` reads the live stream; :func:`verify_entries` checks entries from anywhere
(an export, see :mod:`tessera.audit.export`). Both name every modified, missing,
reordered, duplicated, unlinked or malformed record, every deleted stream message, and
every checkpoint that does not prove what it claims (``forged``: its signature does not
verify with the public keys given, it was signed with a key that does not own the chain,
or it signs a hash the chain no longer has, i.e. the chain was re-hashed after signing).

Records after a chain's last valid checkpoint are *not yet covered*: reported
(:attr:`ChainReport.uncovered`), not a failure. Without public keys (``keys=None``)
signatures are not checked and nothing counts as covered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from tessera.audit.reader import AuditEntry, entries, stream_bounds
from tessera.audit.records import record_hash
from tessera.audit.signing import PublicKeys, checkpoint_payload, key_owns_chain
from tessera.runtime.bus import Topology
from tessera.runtime.errors import Unavailable
from tessera.v1 import audit_pb2

__all__ = [
    "ChainReport",
    "Issue",
    "IssueKind",
    "ReceiptReport",
    "VerifyReport",
    "check_receipt",
    "verify",
    "verify_entries",
]

IssueKind = Literal[
    "modified",
    "missing",
    "reordered",
    "broken_link",
    "duplicate",
    "malformed",
    "deleted",
    "forged",
]
_CHECKPOINT = audit_pb2.AUDIT_KIND_CHECKPOINT


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
    checkpoints: int = 0
    """Checkpoint records whose signature verified."""
    covered_sequence: int = 0
    """Every record up to this position is covered by a valid signed checkpoint."""
    signatures_checked: bool = False
    uncovered: int = 0
    """Records after the last valid checkpoint, checkpoints themselves aside (not yet
    covered: not a failure)."""

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

    @property
    def uncovered(self) -> int:
        return sum(c.uncovered for c in self.chains)

    def chain(self, writer: str) -> ChainReport | None:
        return next((c for c in self.chains if c.writer == writer), None)


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _check_checkpoint(
    writer: str, entry: AuditEntry, by_seq: dict[int, AuditEntry], keys: PublicKeys | None
) -> tuple[int, str]:
    """(covered sequence, "") for a checkpoint that proves its prefix, (0, why) if forged,
    (0, "") when it cannot be judged without keys."""
    record = entry.record
    assert record is not None
    if not record.HasField("checkpoint"):
        return 0, "checkpoint record without a signature"
    cp = record.checkpoint
    if not 0 < cp.covered_sequence < record.sequence:
        return 0, f"checkpoint covers sequence {cp.covered_sequence}, not an earlier record"
    covered = by_seq.get(cp.covered_sequence)
    covered_record = covered.record if covered is not None else None
    if covered_record is not None and covered_record.hash != cp.covered_hash:
        return 0, (
            f"signs a hash sequence {cp.covered_sequence} no longer has: "
            "the chain was re-hashed after it was signed"
        )
    if keys is None:
        return 0, ""
    if not key_owns_chain(cp.key_name, writer):
        return 0, f"signed with {cp.key_name!r}, a key that does not own chain {writer!r}"
    payload = checkpoint_payload(writer, cp.covered_sequence, cp.covered_hash)
    why = keys.check(cp.key_name, cp.key_version, cp.algorithm, payload, cp.signature)
    if why is not None:
        return 0, why
    if covered is None or covered.record is None:
        return 0, ""  # the covered record is missing (reported as such): nothing proven
    return cp.covered_sequence, ""


def check_chain(
    writer: str, chain: Sequence[AuditEntry], keys: PublicKeys | None = None
) -> ChainReport:
    """Verify one chain's entries (in stream order)."""
    issues: list[Issue] = []
    by_seq: dict[int, AuditEntry] = {}
    max_seen = 0
    for entry in chain:
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
    covered_sequence = 0
    valid_checkpoints: set[int] = set()
    for seq, entry in sorted(by_seq.items()):
        record = entry.record
        assert record is not None
        if record.kind == _CHECKPOINT:
            covered, why = _check_checkpoint(writer, entry, by_seq, keys)
            if why:
                issues.append(Issue("forged", writer, seq, entry.stream_sequence, why))
            elif covered:
                valid_checkpoints.add(seq)
                covered_sequence = max(covered_sequence, covered)
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
    carried = sum(len(e.record.carried) for e in chain if e.record is not None)
    return ChainReport(
        writer,
        len(chain),
        max_seen,
        tuple(issues),
        carried,
        checkpoints=len(valid_checkpoints),
        covered_sequence=covered_sequence,
        signatures_checked=keys is not None,
        uncovered=sum(1 for s in by_seq if s > covered_sequence and s not in valid_checkpoints),
    )


def verify_entries(
    stored: Iterable[AuditEntry], *, last_stream_sequence: int, keys: PublicKeys | None = None
) -> VerifyReport:
    """Verify entries read from anywhere; ``last_stream_sequence`` is the stream's last
    sequence (every sequence up to it that is not among ``stored`` was deleted)."""
    chains: dict[str, list[AuditEntry]] = {}
    present: set[int] = set()
    for entry in stored:
        chains.setdefault(entry.writer, []).append(entry)
        present.add(entry.stream_sequence)
    stream_issues: list[Issue] = []
    deleted = [s for s in range(1, last_stream_sequence + 1) if s not in present]
    for lo, hi in _ranges(deleted):
        span = f"stream seq {lo}" if lo == hi else f"stream seqs {lo}-{hi}"
        stream_issues.append(Issue("deleted", "", 0, lo, f"{span} deleted or purged"))
    reports = tuple(check_chain(w, chain, keys) for w, chain in sorted(chains.items()))
    return VerifyReport(chains=reports, stream_issues=tuple(stream_issues))


async def read_all(js: JetStreamContext, topology: Topology) -> tuple[list[AuditEntry], int]:
    """Every stored entry and the stream's last sequence ([], 0 when there is no stream).

    Raises :class:`Unavailable` when the stream cannot be read."""
    try:
        first, last, count = await stream_bounds(js, topology)
    except NotFoundError:
        return [], 0
    except (APIError, nats.errors.Error, TimeoutError) as exc:
        raise Unavailable("audit stream unreachable", reason="AUDIT_UNAVAILABLE") from exc
    stored: list[AuditEntry] = []
    if count:
        try:
            async for entry in entries(js, topology, start_seq=first, stop_seq=last):
                stored.append(entry)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable("audit stream unreachable", reason="AUDIT_UNAVAILABLE") from exc
    return stored, last


async def verify(
    js: JetStreamContext, topology: Topology, *, keys: PublicKeys | None = None
) -> VerifyReport:
    """Read every chain of the audit stream and report what does not verify; with
    ``keys``, also every checkpoint signature.

    Raises :class:`Unavailable` when the stream cannot be read.
    """
    stored, last = await read_all(js, topology)
    return verify_entries(stored, last_stream_sequence=last, keys=keys)


ReceiptStatus = Literal["covered", "not_yet_covered", "failed"]


@dataclass(frozen=True)
class ReceiptReport:
    """What :func:`check_receipt` found: ``covered`` (the record is on its chain unchanged
    and a later valid checkpoint covers it), ``not_yet_covered`` (on its chain, no
    checkpoint yet), or ``failed`` (``detail`` says why)."""

    status: ReceiptStatus
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "covered"


def check_receipt(
    report: VerifyReport, stored: Iterable[AuditEntry], receipt: audit_pb2.AuditReceipt
) -> ReceiptReport:
    """Check one receipt against verified entries (``report`` from the same entries, with
    keys: without signatures nothing is covered)."""
    chain = report.chain(receipt.writer)
    if chain is None:
        return ReceiptReport("failed", f"no chain {receipt.writer!r} in the audit stream")
    found = [
        e
        for e in stored
        if e.writer == receipt.writer
        and e.record is not None
        and e.record.sequence == receipt.sequence
    ]
    if not found:
        return ReceiptReport(
            "failed", f"chain {receipt.writer!r} has no sequence {receipt.sequence}"
        )
    if len(found) > 1:
        return ReceiptReport("failed", f"sequence {receipt.sequence} is stored more than once")
    record = found[0].record
    assert record is not None
    if record.hash != receipt.record_hash or record_hash(record) != record.hash:
        return ReceiptReport("failed", "the stored record's hash differs from the receipt's")
    if receipt.decision_id and record.decision_id != receipt.decision_id:
        return ReceiptReport("failed", "the stored record names another decision id")
    if any(i.sequence <= max(receipt.sequence, chain.covered_sequence) for i in chain.issues):
        return ReceiptReport("failed", f"chain {receipt.writer!r} has integrity issues before it")
    if chain.covered_sequence >= receipt.sequence:
        return ReceiptReport(
            "covered",
            f"record {receipt.writer}:{receipt.sequence} is covered by a signed checkpoint "
            f"(through sequence {chain.covered_sequence})",
        )
    return ReceiptReport(
        "not_yet_covered",
        f"record {receipt.writer}:{receipt.sequence} is on its chain; no signed checkpoint "
        f"covers it yet (last covered: {chain.covered_sequence})",
    )
