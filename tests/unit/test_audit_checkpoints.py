"""Checkpoint signatures, forgery detection, exports and receipts, without any server:
chains are built in memory with the writer's own chaining rule and signed with a local
ed25519 key (the same algorithm Transit uses)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format

from tessera.audit import (
    AuditEntry,
    PublicKeys,
    check_receipt,
    checkpoint_payload,
    key_owns_chain,
    load_export,
    receipt_for,
    record_hash,
    verify_entries,
    write_export,
)
from tessera.cli.audit import parse_receipt
from tessera.v1 import audit_pb2

CHAIN = "policy-a1"


class Key:
    """One version of an ed25519 signing key, as Transit would hold it."""

    def __init__(self, name: str = "audit-policy", version: int = 1) -> None:
        self.name, self.version = name, version
        self._private = Ed25519PrivateKey.generate()

    @property
    def public(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, payload: bytes) -> bytes:
        return self._private.sign(payload)


def keys_of(*keys: Key) -> PublicKeys:
    table: dict[str, dict[int, bytes]] = {}
    for key in keys:
        table.setdefault(key.name, {})[key.version] = key.public
    return PublicKeys(table, {name: "ed25519" for name in table})


def chain_record(prev: audit_pb2.AuditRecord | None, **fields: object) -> audit_pb2.AuditRecord:
    record = audit_pb2.AuditRecord(record_id=str(uuid.uuid4()), actor="policy", **fields)  # type: ignore[arg-type]
    record.sequence = prev.sequence + 1 if prev else 1
    record.prev_hash = prev.hash if prev else b""
    record.hash = record_hash(record)
    return record


def checkpoint(prev: audit_pb2.AuditRecord, key: Key, chain: str = CHAIN) -> audit_pb2.AuditRecord:
    payload = checkpoint_payload(chain, prev.sequence, prev.hash)
    cp = audit_pb2.AuditCheckpoint(
        covered_sequence=prev.sequence,
        covered_hash=prev.hash,
        key_name=key.name,
        key_version=key.version,
        algorithm="ed25519",
        signature=key.sign(payload),
    )
    return chain_record(prev, kind=audit_pb2.AUDIT_KIND_CHECKPOINT, checkpoint=cp)


def build(key: Key, *, records: int = 4, every: int = 2) -> list[audit_pb2.AuditRecord]:
    out: list[audit_pb2.AuditRecord] = []
    for i in range(records):
        out.append(chain_record(out[-1] if out else None, outcome="allow", resource=f"t.{i}"))
        if (i + 1) % every == 0:
            out.append(checkpoint(out[-1], key))
    return out


def entries(records: list[audit_pb2.AuditRecord], chain: str = CHAIN) -> list[AuditEntry]:
    return [
        AuditEntry(i + 1, chain, r, data=r.SerializeToString(deterministic=True))
        for i, r in enumerate(records)
    ]


def rehash_from(records: list[audit_pb2.AuditRecord], index: int) -> None:
    """What a forger with write access does: re-link and re-hash every later record."""
    for i in range(index, len(records)):
        if i:
            records[i].prev_hash = records[i - 1].hash
        records[i].hash = record_hash(records[i])


def test_a_signed_chain_verifies_and_is_fully_covered() -> None:
    key = Key()
    records = build(key, records=4, every=2)

    report = verify_entries(entries(records), last_stream_sequence=len(records), keys=keys_of(key))

    chain = report.chains[0]
    assert report.ok, [str(i) for i in report.issues]
    assert chain.checkpoints == 2 and chain.covered_sequence == 5 and chain.uncovered == 0


def test_records_after_the_last_checkpoint_are_not_yet_covered_not_failures() -> None:
    key = Key()
    records = build(key, records=2, every=2)
    records.append(chain_record(records[-1], outcome="allow"))
    records.append(chain_record(records[-1], outcome="deny"))

    report = verify_entries(entries(records), last_stream_sequence=len(records), keys=keys_of(key))

    assert report.ok
    assert report.chains[0].uncovered == 2 and report.chains[0].covered_sequence == 2


def test_a_rehashed_chain_is_forged_even_though_every_hash_matches() -> None:
    key = Key()
    records = build(key, records=4, every=2)
    records[1].outcome = "deny"  # the forger edits record 2 ...
    rehash_from(records, 1)  # ... and re-hashes the rest of the chain

    report = verify_entries(entries(records), last_stream_sequence=len(records), keys=keys_of(key))

    kinds = {(i.kind, i.sequence) for i in report.issues}
    assert kinds == {("forged", 3), ("forged", 6)}
    assert all("re-hashed" in i.detail for i in report.issues)
    assert report.chains[0].covered_sequence == 0


def test_rewriting_the_signed_hash_too_breaks_the_signature() -> None:
    key = Key()
    records = build(key, records=2, every=2)
    records[0].outcome = "deny"
    rehash_from(records, 0)
    records[2].checkpoint.covered_hash = records[1].hash
    rehash_from(records, 2)

    report = verify_entries(entries(records), last_stream_sequence=3, keys=keys_of(key))

    assert [(i.kind, i.sequence) for i in report.issues] == [("forged", 3)]
    assert "does not verify" in report.issues[0].detail


def test_a_valid_signature_from_a_key_that_does_not_own_the_chain_is_forged() -> None:
    theirs = Key("audit-tool-proxy")
    records = build(theirs, records=2, every=2)

    report = verify_entries(entries(records), last_stream_sequence=3, keys=keys_of(theirs))

    assert [i.kind for i in report.issues] == ["forged"]
    assert "does not own" in report.issues[0].detail


def test_signatures_of_every_key_version_verify() -> None:
    v1, v2 = Key(version=1), Key(version=2)
    records = build(v1, records=2, every=2)
    records.append(chain_record(records[-1], outcome="allow"))
    records.append(checkpoint(records[-1], v2))

    report = verify_entries(entries(records), last_stream_sequence=5, keys=keys_of(v1, v2))
    only_new = verify_entries(entries(records), last_stream_sequence=5, keys=keys_of(v2))

    assert report.ok and report.chains[0].checkpoints == 2
    assert [i.detail for i in only_new.issues] == [
        "signed with unknown version 1 of 'audit-policy'"
    ]


def test_without_keys_nothing_is_covered_but_rehashing_still_shows() -> None:
    key = Key()
    records = build(key, records=2, every=2)
    clean = verify_entries(entries(records), last_stream_sequence=3)
    records[0].outcome = "deny"
    rehash_from(records, 0)
    forged = verify_entries(entries(records), last_stream_sequence=3)

    assert clean.ok and not clean.chains[0].signatures_checked
    assert clean.chains[0].covered_sequence == 0
    assert [i.kind for i in forged.issues] == ["forged"]


@pytest.mark.parametrize(
    ("key_name", "chain", "owns"),
    [
        ("audit-policy", "policy", True),
        ("audit-policy", "policy-1a2b", True),
        ("audit-policy", "policyx-1", False),
        ("audit-tool", "tool-proxy-1", True),  # an identity "tool" would own it: none exists
        ("audit-tool-proxy", "tool-proxy-1", True),
        ("audit-coordinator", "policy-1", False),
        ("policy", "policy", False),
        ("audit-", "x", False),
    ],
)
def test_which_key_owns_which_chain(key_name: str, chain: str, owns: bool) -> None:
    assert key_owns_chain(key_name, chain) is owns


def test_the_payload_names_the_chain_position_and_hash() -> None:
    digest = hashlib.sha256(b"x").digest()
    assert checkpoint_payload("policy-1", 7, digest) == (
        b"tessera-audit-checkpoint/v1\npolicy-1\n7\n" + digest.hex().encode()
    )


def test_an_export_round_trips_and_verifies_offline(tmp_path: Path) -> None:
    key = Key()
    records = build(key, records=3, every=3)
    path = tmp_path / "audit.jsonl"

    written = write_export(
        path,
        entries(records),
        namespace="ns",
        stream="NS_AUDIT",
        last_stream_sequence=len(records),
        keys=keys_of(key),
    )
    loaded = load_export(path)
    report = verify_entries(
        loaded.entries, last_stream_sequence=loaded.last_stream_sequence, keys=loaded.keys
    )

    assert written == 4 and loaded.namespace == "ns"
    assert report.ok and report.chains[0].covered_sequence == 3


def test_an_export_with_a_missing_line_shows_the_deleted_sequence(tmp_path: Path) -> None:
    key = Key()
    records = build(key, records=3, every=3)
    stored = entries(records)
    del stored[1]
    path = tmp_path / "audit.jsonl"
    write_export(
        path, stored, namespace="ns", stream="S", last_stream_sequence=4, keys=keys_of(key)
    )

    loaded = load_export(path)
    report = verify_entries(loaded.entries, last_stream_sequence=4, keys=loaded.keys)

    assert {(i.kind, i.stream_sequence) for i in report.issues} >= {("deleted", 2)}


def test_a_receipt_is_covered_only_once_a_later_checkpoint_signs_it() -> None:
    key = Key()
    records = [chain_record(None, outcome="allow", decision_id="d-1")]
    receipt = receipt_for(CHAIN, records[0])
    before = verify_entries(entries(records), last_stream_sequence=1, keys=keys_of(key))
    records.append(checkpoint(records[0], key))
    after = verify_entries(entries(records), last_stream_sequence=2, keys=keys_of(key))

    assert check_receipt(before, entries(records[:1]), receipt).status == "not_yet_covered"
    assert check_receipt(after, entries(records), receipt).status == "covered"


def test_a_receipt_for_an_altered_record_fails() -> None:
    key = Key()
    records = build(key, records=2, every=2)
    receipt = receipt_for(CHAIN, records[0])
    wrong = audit_pb2.AuditReceipt()
    wrong.CopyFrom(receipt)
    wrong.record_hash = hashlib.sha256(b"other").digest()
    report = verify_entries(entries(records), last_stream_sequence=3, keys=keys_of(key))

    assert check_receipt(report, entries(records), receipt).ok
    assert check_receipt(report, entries(records), wrong).status == "failed"
    other_chain = audit_pb2.AuditReceipt(writer="policy-zz", sequence=1)
    assert check_receipt(report, entries(records), other_chain).status == "failed"


def test_receipts_parse_from_json_and_compact_forms() -> None:
    digest = hashlib.sha256(b"r").digest()
    compact = parse_receipt(f"tool-proxy-1:12:{digest.hex()}:dec-9")
    as_json = parse_receipt(json_format.MessageToJson(compact))

    assert compact == as_json
    assert (compact.writer, compact.sequence, compact.record_hash, compact.decision_id) == (
        "tool-proxy-1",
        12,
        digest,
        "dec-9",
    )
    with pytest.raises(ValueError):
        parse_receipt("nonsense")
