"""Hash-chained audit records against a real nats-server (session fixture ``nats_url``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext

from tessera.audit import (
    HMAC_PREFIX,
    AuditWriter,
    hmac_digest,
    record_hash,
    scrub,
    tail,
    verify,
)
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import Unavailable
from tessera.v1 import audit_pb2

DECISION = audit_pb2.AUDIT_KIND_POLICY_DECISION
TOOL_CALL = audit_pb2.AUDIT_KIND_TOOL_CALL


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="test-audit")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def bus(nc: Client, namespace: str) -> tuple[JetStreamContext, Topology]:
    js = nc.jetstream()
    topology = Topology(namespace)
    await declare(js, topology)
    return js, topology


@pytest.fixture
async def permissive_bus(nc: Client, namespace: str) -> tuple[JetStreamContext, Topology]:
    """An audit stream that still allows deleting messages, as streams declared before
    ``deny_delete`` did (``declare`` now refuses both): verify must still name what was
    deleted from such a stream."""
    js = nc.jetstream()
    topology = Topology(namespace)
    await js.add_stream(name=topology.audit_stream, subjects=[topology.audit_subjects])
    return js, topology


async def _writer(bus: tuple[JetStreamContext, Topology], name: str = "policy-1") -> AuditWriter:
    js, topology = bus
    writer = AuditWriter(js, topology, writer=name, actor="policy")
    await writer.start()
    return writer


async def _write(writer: AuditWriter, count: int) -> list[audit_pb2.AuditRecord]:
    return [
        await writer.append(DECISION, outcome="allow", resource=f"tool.{i}", decision_id=f"d{i}")
        for i in range(count)
    ]


async def test_chain_of_two_writers_verifies(bus: tuple[JetStreamContext, Topology]) -> None:
    a, b = await _writer(bus, "policy-a"), await _writer(bus, "proxy-b")
    records = await _write(a, 3)
    await _write(b, 2)
    assert [r.sequence for r in records] == [1, 2, 3]
    assert records[0].prev_hash == b""
    assert records[1].prev_hash == records[0].hash
    assert all(record_hash(r) == r.hash for r in records)

    report = await verify(*bus)

    assert report.ok, [str(i) for i in report.issues]
    assert {(c.writer, c.records, c.head_sequence) for c in report.chains} == {
        ("policy-a", 3, 3),
        ("proxy-b", 2, 2),
    }


async def test_empty_stream_verifies(bus: tuple[JetStreamContext, Topology]) -> None:
    report = await verify(*bus)
    assert report.ok and report.records == 0


async def test_restarted_writer_continues_its_chain(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    first = await _write(await _writer(bus), 2)
    restarted = await _writer(bus)
    assert restarted.head_sequence == 2

    record = await restarted.append(DECISION, outcome="deny")

    assert record.sequence == 3 and record.prev_hash == first[-1].hash
    assert (await verify(*bus)).ok


async def test_two_instances_with_one_writer_name_never_fork(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    one, two = await _writer(bus), await _writer(bus)
    await one.append(DECISION, outcome="allow")
    # `two` still believes the chain is empty: JetStream refuses its stale publish, it
    # re-reads the head and continues the chain instead of starting a second sequence 1.
    record = await two.append(DECISION, outcome="deny")
    assert record.sequence == 2
    await asyncio.gather(*(w.append(DECISION, outcome="allow") for w in (one, two, one, two)))

    report = await verify(*bus)

    assert report.ok, [str(i) for i in report.issues]
    assert report.chains[0].head_sequence == 6


async def test_deleted_record_is_a_named_gap(
    permissive_bus: tuple[JetStreamContext, Topology],
) -> None:
    bus = permissive_bus
    js, topology = bus
    await _write(await _writer(bus), 4)
    await js.delete_msg(topology.audit_stream, 2)

    report = await verify(js, topology)

    assert not report.ok
    kinds = {(i.kind, i.sequence, i.stream_sequence) for i in report.issues}
    assert ("missing", 2, 3) in kinds  # chain seq 2 missing, found before stream seq 3
    assert ("deleted", 0, 2) in kinds


async def test_deleting_the_last_record_is_reported(
    permissive_bus: tuple[JetStreamContext, Topology],
) -> None:
    bus = permissive_bus
    js, topology = bus
    await _write(await _writer(bus), 3)
    await js.delete_msg(topology.audit_stream, 3)

    report = await verify(js, topology)

    assert [(i.kind, i.stream_sequence) for i in report.issues] == [("deleted", 3)]


async def test_forged_record_breaks_hash_and_link(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    js, topology = bus
    writer = await _writer(bus)
    records = await _write(writer, 2)
    # An attacker with publish rights appends a record claiming to be sequence 3, with
    # content altered after hashing (hash no longer matches) and an invented prev_hash.
    forged = audit_pb2.AuditRecord()
    forged.CopyFrom(records[-1])
    forged.sequence = 3
    forged.record_id = "forged"
    forged.prev_hash = b"\x00" * 32
    forged.outcome = "allow"
    forged.hash = record_hash(forged)
    forged.resource = "billing.issue_refund"
    await js.publish(writer.subject, forged.SerializeToString())

    report = await verify(js, topology)

    kinds = {(i.kind, i.sequence, i.stream_sequence) for i in report.issues}
    assert kinds == {("modified", 3, 3), ("broken_link", 3, 3)}


async def test_altered_copy_of_a_record_is_detected(
    permissive_bus: tuple[JetStreamContext, Topology],
) -> None:
    bus = permissive_bus
    js, topology = bus
    writer = await _writer(bus)
    records = await _write(writer, 3)
    # "Edit" record 2: delete it and republish a copy whose outcome says deny.
    await js.delete_msg(topology.audit_stream, 2)
    altered = audit_pb2.AuditRecord()
    altered.CopyFrom(records[1])
    altered.outcome = "deny"
    await js.publish(writer.subject, altered.SerializeToString())

    report = await verify(js, topology)

    kinds = {(i.kind, i.sequence) for i in report.issues}
    assert ("modified", 2) in kinds
    assert ("reordered", 2) in kinds
    assert ("deleted", 0) in kinds


async def test_swapped_records_are_reordered(
    permissive_bus: tuple[JetStreamContext, Topology],
) -> None:
    bus = permissive_bus
    js, topology = bus
    writer = await _writer(bus)
    records = await _write(writer, 4)
    # Swap 2 and 3: delete both, republish 3 then 2 (content and hashes untouched).
    for seq in (2, 3):
        await js.delete_msg(topology.audit_stream, seq)
    for record in (records[2], records[1]):
        await js.publish(writer.subject, record.SerializeToString())

    report = await verify(js, topology)

    chain_issues = {(i.kind, i.sequence) for c in report.chains for i in c.issues}
    assert chain_issues == {("reordered", 2), ("reordered", 3)}


async def test_garbage_on_a_chain_subject_is_malformed(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    js, topology = bus
    writer = await _writer(bus)
    await _write(writer, 1)
    await js.publish(writer.subject, b"\xff\xff not a record")

    report = await verify(js, topology)

    assert [(i.kind, i.stream_sequence) for i in report.issues] == [("malformed", 2)]


async def test_tail_reads_the_last_records_in_order(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    js, topology = bus
    await _write(await _writer(bus), 5)

    entries = [e async for e in tail(js, topology, n=3)]

    assert [e.record.sequence for e in entries if e.record] == [3, 4, 5]
    assert {e.writer for e in entries} == {"policy-1"}


async def test_tail_follow_sees_new_records(bus: tuple[JetStreamContext, Topology]) -> None:
    js, topology = bus
    writer = await _writer(bus)
    await _write(writer, 1)
    seen: list[int] = []
    caught_up = asyncio.Event()

    async def follow() -> None:
        async for entry in tail(js, topology, follow=True, n=1):
            assert entry.record is not None
            seen.append(entry.record.sequence)
            caught_up.set()
            if len(seen) == 3:
                return

    task = asyncio.create_task(follow())
    await asyncio.wait_for(caught_up.wait(), timeout=10)
    await _write(writer, 2)
    await asyncio.wait_for(task, timeout=10)
    assert seen == [1, 2, 3]


async def test_unwritable_stream_raises_unavailable(nc: Client, namespace: str) -> None:
    js = nc.jetstream(timeout=0.5)
    writer = AuditWriter(js, Topology(namespace), writer="w", actor="policy", publish_timeout_s=0.5)
    # No stream declared: nothing stores the record, so nothing may pretend it was written.
    with pytest.raises(Unavailable):
        await writer.start()
        await writer.append(DECISION, outcome="allow")


async def test_details_are_scrubbed_in_the_stored_record(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    writer = await _writer(bus)
    key = b"k" * 32
    record = await writer.append(
        audit_pb2.AUDIT_KIND_TOOL_CALL,
        details={
            "arguments": {
                "customer": "c-1",
                "api_key": "sk-live-123",
                "nested": [{"password": "x"}],
            },
            "vault_token": "hvs.CAESIJ1234567890abcdefghij",
            "card_hmac": hmac_digest(key, "4111111111111111"),
            "note": "hvs.CAESIJ1234567890abcdefghij",
        },
    )
    text = json_format.MessageToJson(record.details)
    assert "sk-live-1" not in text and "hvs." not in text
    assert json_format.MessageToDict(record.details)["arguments"]["customer"] == "c-1"
    assert str(record.details["card_hmac"]).startswith(HMAC_PREFIX)
    assert "4111" not in text


SENSITIVE_KEYS = st.sampled_from(
    ["token", "api_key", "password", "client_secret", "Authorization", "X-Api-Key", "secret_id"]
)
SECRET = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24).map(
    lambda s: "S3CR3T" + s
)
PLAIN_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda k: not any(w in k for w in ("token", "secret", "password", "key", "auth", "cred"))
)


@st.composite
def details_with_secrets(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    secrets: list[str] = []

    def node(depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                secret = draw(SECRET)
                secrets.append(secret)
                out[draw(SENSITIVE_KEYS) + draw(st.sampled_from(["", "_x"]))] = secret
            elif depth < 3 and draw(st.booleans()):
                out[draw(PLAIN_KEY)] = draw(st.sampled_from([node, lambda d: [node(d)]]))(depth + 1)
            else:
                out[draw(PLAIN_KEY)] = draw(st.text(alphabet="xyz ", max_size=5))
        return out

    return node(0), secrets


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(details_with_secrets())
def test_scrub_never_keeps_a_secret_under_a_sensitive_key(
    case: tuple[dict[str, Any], list[str]],
) -> None:
    details, secrets = case
    text = json.dumps(scrub(details))
    for secret in secrets:
        assert secret not in text


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=details_with_secrets())
async def test_no_secret_reaches_a_stored_record(
    bus: tuple[JetStreamContext, Topology], case: tuple[dict[str, Any], list[str]]
) -> None:
    details, secrets = case
    js, topology = bus
    writer = AuditWriter(js, topology, writer="prop", actor="proxy")
    await writer.start()
    await writer.append(audit_pb2.AUDIT_KIND_TOOL_CALL, details=details)
    msg = await js.get_last_msg(topology.audit_stream, writer.subject)
    for secret in secrets:
        assert secret.encode() not in (msg.data or b"")


def test_hmac_digest_is_keyed_and_stable() -> None:
    assert hmac_digest(b"k1", "v") == hmac_digest(b"k1", "v")
    assert hmac_digest(b"k1", "v") != hmac_digest(b"k2", "v")
    with pytest.raises(ValueError):
        hmac_digest(b"", "v")


# -- deferred records ---------------------------------------------------------------------


async def test_deferred_records_ride_on_the_next_record_in_order(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    js, topology = bus
    writer = await _writer(bus, "proxy-1")
    for i in range(3):
        writer.defer(TOOL_CALL, outcome="executed", decision_id=f"d{i}", details={"i": i})
    allow = await writer.append(TOOL_CALL, outcome="allow", decision_id="d3")

    # One stored record, covered by its own hash, carries the three; readers list them first.
    assert allow.sequence == 1 and [c.decision_id for c in allow.carried] == ["d0", "d1", "d2"]
    assert record_hash(allow) == allow.hash
    assert writer.deferred == 0
    entries = [e async for e in tail(js, topology, n=10)]
    listed = [(e.record.decision_id, e.carried_by) for e in entries if e.record]
    assert listed == [("d0", 1), ("d1", 1), ("d2", 1), ("d3", 0)]
    assert len({e.record.record_id for e in entries if e.record}) == 4
    assert (await verify(js, topology)).ok


async def test_a_deferred_record_is_written_on_its_own_within_the_linger(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    js, topology = bus
    writer = AuditWriter(js, topology, writer="proxy-2", actor="tool-proxy", linger_s=0.01)
    await writer.start()
    writer.defer(TOOL_CALL, outcome="executed", decision_id="late")

    async def stored() -> list[str]:
        while True:
            entries = [e async for e in tail(js, topology, n=10)]
            if entries:
                return [e.record.decision_id for e in entries if e.record]
            await asyncio.sleep(0.01)

    assert await asyncio.wait_for(stored(), timeout=10) == ["late"]
    assert writer.deferred == 0 and writer.head_sequence == 1


async def test_flush_writes_a_large_backlog_in_order_in_bounded_records(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    js, topology = bus
    writer = AuditWriter(js, topology, writer="proxy-3", actor="tool-proxy", max_carried=4)
    await writer.start()
    for i in range(11):
        writer.defer(TOOL_CALL, outcome="executed", decision_id=f"d{i:02}")
    await writer.close()

    entries = [e async for e in tail(js, topology, n=10)]
    assert [e.record.decision_id for e in entries if e.record] == [f"d{i:02}" for i in range(11)]
    assert writer.head_sequence == 3  # 5 + 5 + 1 records per stored message
    assert (await verify(js, topology)).ok


async def test_a_tampered_carried_record_is_detected(
    permissive_bus: tuple[JetStreamContext, Topology],
) -> None:
    bus = permissive_bus
    js, topology = bus
    writer = await _writer(bus, "proxy-4")
    writer.defer(TOOL_CALL, outcome="executed", decision_id="d0")
    stored = await writer.append(TOOL_CALL, outcome="allow", decision_id="d1")
    await js.delete_msg(topology.audit_stream, 1)
    altered = audit_pb2.AuditRecord()
    altered.CopyFrom(stored)
    altered.carried[0].outcome = "denied"
    await js.publish(writer.subject, altered.SerializeToString())

    report = await verify(js, topology)

    assert ("modified", 1) in {(i.kind, i.sequence) for i in report.issues}


async def test_deferred_records_survive_a_failed_write(nc: Client, namespace: str) -> None:
    js = nc.jetstream(timeout=0.5)
    topology = Topology(namespace)
    await declare(js, topology)
    writer = AuditWriter(js, topology, writer="proxy-5", actor="tool-proxy", publish_timeout_s=0.5)
    await writer.start()
    writer.defer(TOOL_CALL, outcome="executed", decision_id="d0")
    await js.delete_stream(topology.audit_stream)
    with pytest.raises(Unavailable):
        await writer.append(TOOL_CALL, outcome="allow", decision_id="d1")
    assert writer.deferred == 1  # not lost with the refused record
    await declare(js, topology)
    await writer.close()
    entries = [e async for e in tail(js, topology, n=10)]
    assert [e.record.decision_id for e in entries if e.record] == ["d0"]


class _HeldPublishes:
    """The real JetStream context, holding each publish until the test lets it go."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.publishing, self.go_on = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        self.publishing.set()
        await self.go_on.wait()
        return await self._js.publish(*args, **kwargs)


async def test_a_write_whose_caller_is_cancelled_is_stored_and_the_chain_goes_on(
    bus: tuple[JetStreamContext, Topology],
) -> None:
    # A gRPC handler cancelled because its client died mid-call: the record it was
    # writing is stored all the same, and the next one continues the chain from it.
    js, topology = bus
    held = _HeldPublishes(js)
    writer = AuditWriter(held, topology, writer="proxy-6", actor="tool-proxy")  # type: ignore[arg-type]
    await writer.start()
    writer.defer(TOOL_CALL, outcome="executed", decision_id="d0")
    cut = asyncio.create_task(writer.append(TOOL_CALL, outcome="allow", decision_id="d1"))
    await held.publishing.wait()
    cut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cut
    held.go_on.set()
    after = await writer.append(TOOL_CALL, outcome="refused", decision_id="d2")

    assert after.sequence == 2
    entries = [e async for e in tail(js, topology, n=10)]
    assert [e.record.decision_id for e in entries if e.record] == ["d0", "d1", "d2"]
    assert (await verify(js, topology)).ok
