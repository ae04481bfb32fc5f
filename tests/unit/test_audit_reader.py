"""The audit reader's view of one workflow: its records out of the verified stream, each
with its chain's verdict, and who may read them decided on the coordinator's own record
of the start (chains built in memory, signed with a local ed25519 key)."""

from __future__ import annotations

import uuid

from services.audit_reader.trail import verified_records, workflow_attributes
from tessera.audit import AuditEntry, checkpoint_payload, record_hash, verify_entries
from tessera.v1 import audit_pb2
from tests.unit.test_audit_checkpoints import Key, keys_of

RV = audit_pb2.RecordVerification
CHAIN = "coordinator-a"


def record(prev: audit_pb2.AuditRecord | None, **fields: object) -> audit_pb2.AuditRecord:
    out = audit_pb2.AuditRecord(record_id=uuid.uuid4().hex, actor="coordinator", **fields)  # type: ignore[arg-type]
    out.sequence = prev.sequence + 1 if prev else 1
    out.prev_hash = prev.hash if prev else b""
    out.time.FromSeconds(1_700_000_000 + out.sequence)
    out.hash = record_hash(out)
    return out


def signed(prev: audit_pb2.AuditRecord, key: Key) -> audit_pb2.AuditRecord:
    cp = audit_pb2.AuditCheckpoint(
        covered_sequence=prev.sequence,
        covered_hash=prev.hash,
        key_name=key.name,
        key_version=key.version,
        algorithm="ed25519",
        signature=key.sign(checkpoint_payload(CHAIN, prev.sequence, prev.hash)),
    )
    return record(prev, kind=audit_pb2.AUDIT_KIND_CHECKPOINT, checkpoint=cp)


def started(prev: audit_pb2.AuditRecord | None, wf: str) -> audit_pb2.AuditRecord:
    out = record(
        prev,
        kind=audit_pb2.AUDIT_KIND_WORKFLOW_TRANSITION,
        workflow_id=wf,
        outcome="started",
        resource=f"workflows/{wf}",
    )
    out.details.update({"started_by": "requester", "template": "support"})
    out.hash = record_hash(out)
    return out


def stored(records: list[audit_pb2.AuditRecord], owner: str = "coordinator") -> list[AuditEntry]:
    return [AuditEntry(i + 1, CHAIN, r, owner=owner) for i, r in enumerate(records)]


def test_a_workflows_records_carry_their_chains_verdict() -> None:
    key = Key("audit-coordinator")
    chain = [started(None, "wf1")]
    chain.append(record(chain[-1], kind=audit_pb2.AUDIT_KIND_APPROVAL, workflow_id="wf1"))
    chain.append(record(chain[-1], kind=audit_pb2.AUDIT_KIND_APPROVAL, workflow_id="other"))
    chain.append(signed(chain[-1], key))
    chain.append(
        record(chain[-1], kind=audit_pb2.AUDIT_KIND_WORKFLOW_TRANSITION, workflow_id="wf1")
    )
    entries = stored(chain)
    report = verify_entries(entries, last_stream_sequence=len(entries), keys=keys_of(key))
    views = verified_records(entries, report, "wf1")
    assert [v.record.sequence for v in views] == [1, 2, 5]  # only its own, oldest first
    assert [v.verification for v in views] == [
        RV.RECORD_VERIFICATION_VERIFIED,
        RV.RECORD_VERIFICATION_VERIFIED,
        RV.RECORD_VERIFICATION_NOT_YET_COVERED,  # after the last signed checkpoint
    ]
    assert views[0].receipt.writer == CHAIN and views[0].receipt.sequence == 1
    assert workflow_attributes(views) == {"template": "support", "started_by": "requester"}


def test_a_tampered_record_fails_and_nobody_is_shown_a_trail_without_a_trusted_start() -> None:
    key = Key("audit-coordinator")
    chain = [started(None, "wf1")]
    chain.append(signed(chain[-1], key))
    chain[0].details.update({"started_by": "mallory"})  # edited after it was hashed
    entries = stored(chain)
    report = verify_entries(entries, last_stream_sequence=len(entries), keys=keys_of(key))
    views = verified_records(entries, report, "wf1")
    assert views[0].verification == RV.RECORD_VERIFICATION_FAILED
    assert workflow_attributes(views) is None  # a failed record decides nothing
    # Nor does a "start" on a chain another identity owns.
    other = stored([started(None, "wf2")], owner="tool-proxy")
    report = verify_entries(other, last_stream_sequence=1, keys=None)
    assert workflow_attributes(verified_records(other, report, "wf2")) is None
