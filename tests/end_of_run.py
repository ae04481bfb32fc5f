"""RELIABILITY.md's end-of-run checks that read what the mesh stored (not what clients
saw): C6 every tool execution has its `allow` record carrying its decision id and every
audit chain verifies; C7 no side effect happened twice; C8 no side effect is left on a
workflow that did not succeed. Shared by the load test and the chaos suite."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext, api

from services.tool_proxy.tools.builtin import effects_subject
from tessera.audit import VerifyReport, tail, verify
from tessera.runtime.bus import Topology, connect
from tessera.v1 import audit_pb2

REFUND = "billing.issue_refund"
REVERSAL = "billing.reverse_refund"
SIDE_EFFECTING = (REFUND, REVERSAL, "email.send")


@dataclass(frozen=True)
class Stored:
    records: list[audit_pb2.AuditRecord]
    effects: list[dict[str, Any]]
    report: VerifyReport


async def read_stored(
    nats_url: str, namespace: str, ids: set[str], *, nats_options: dict[str, Any] | None = None
) -> Stored:
    """The audit records and side effects of the workflows ``ids``, and the audit
    trail's verification. ``nats_options``: TLS as the operator, on a `tessera up` mesh."""
    nc = await connect(nats_url, name="end-of-run-checks", **(nats_options or {}))
    try:
        js = nc.jetstream()
        topology = Topology(namespace)
        records: list[audit_pb2.AuditRecord] = []
        seen: set[str] = set()
        async for entry in tail(js, topology, n=1_000_000):
            record = entry.record
            if record is None or record.workflow_id not in ids or record.record_id in seen:
                # The same record twice (same record_id): a deferred record carried again
                # after a publish whose outcome was unknown. One record, not two events.
                continue
            seen.add(record.record_id)
            records.append(record)
        effects = await read_effects(js, topology, ids)
        report = await verify(js, topology)
    finally:
        await nc.close()
    return Stored(records, effects, report)


async def read_effects(
    js: JetStreamContext, topology: Topology, ids: set[str]
) -> list[dict[str, Any]]:
    """The side effects the tools' outbox recorded for the workflows ``ids``."""
    subject = effects_subject(topology)
    info = await js.stream_info(topology.events_stream, subjects_filter=subject)
    total = (info.state.subjects or {}).get(subject, 0)
    if not total:
        return []
    sub = await js.subscribe(
        subject,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
    )
    found: list[dict[str, Any]] = []
    try:
        for _ in range(total):
            body = json.loads((await sub.next_msg(timeout=5.0)).data)
            if body["workflow_id"] in ids:
                found.append(body)
    finally:
        await sub.unsubscribe()
    return found


def check_executions(stored: Stored, *, unfinished_allowed: int) -> int:
    """C6: per workflow and tool, the `allow` records not refused afterwards are the
    executions, one for one, each carrying the decision id of its allow; the chains
    verify. A proxy killed between an allow and its outcome leaves allows without one:
    at most ``unfinished_allowed``. Returns the number of executions."""
    by_call: defaultdict[tuple[str, str], list[audit_pb2.AuditRecord]] = defaultdict(list)
    for record in stored.records:
        if record.actor == "tool-proxy":
            by_call[(record.workflow_id, record.resource)].append(record)
    executions = 0
    unfinished: list[tuple[str, str, str]] = []
    allow_ids: set[str] = set()
    for (wf, tool), calls in by_call.items():
        refused = {r.decision_id for r in calls if r.outcome not in ("allow", "executed")}
        allowed = {
            r.decision_id for r in calls if r.outcome == "allow" and r.decision_id not in refused
        }
        executed = [r.decision_id for r in calls if r.outcome == "executed"]
        allow_ids |= allowed
        assert all(executed), (wf, tool)
        assert len(set(executed)) == len(executed), f"{tool} executed twice for one decision: {wf}"
        assert set(executed) <= allowed, f"{tool} executed without its allow record: {wf}"
        if tool in SIDE_EFFECTING:
            assert len(executed) <= 1, f"{tool} executed {len(executed)} times for {wf}"
        unfinished.extend((wf, tool, d) for d in sorted(allowed - set(executed)))
        executions += len(executed)
    # Named, so a failure says which workflow, tool and decision to look up.
    assert len(unfinished) <= unfinished_allowed, unfinished
    assert all(e["decision_id"] in allow_ids for e in stored.effects), "an effect without an allow"
    assert stored.report.ok, stored.report.issues
    return executions


def check_effects_once(
    stored: Stored,
    *,
    refunding: Iterable[str],
    succeeded: Iterable[str],
    compensated: Iterable[str] = (),
) -> None:
    """C7 and C8: exactly one refund for each workflow in ``refunding`` (ids), none for
    any other; no side effect twice for one idempotency key; no side effect on a
    workflow outside ``succeeded`` unless it is ``compensated`` and each of its refunds
    was reversed exactly once."""
    refunds = Counter(e["workflow_id"] for e in stored.effects if e["tool"] == REFUND)
    assert refunds == Counter(dict.fromkeys(refunding, 1)), refunds
    keys = Counter((e["workflow_id"], e["idempotency_key"]) for e in stored.effects)
    assert not keys or max(keys.values()) == 1, [k for k, v in keys.items() if v > 1]
    undone = set(compensated)
    reversed_refunds = Counter(
        e["effect"].get("refund_effect_id") for e in stored.effects if e["tool"] == REVERSAL
    )
    for effect in stored.effects:
        if effect["workflow_id"] in undone and effect["tool"] == REFUND:
            assert reversed_refunds[effect["effect_id"]] == 1, f"refund not reversed: {effect}"
    stranded = (
        {e["workflow_id"] for e in stored.effects if e["tool"] != REVERSAL}
        - set(succeeded)
        - undone
    )
    assert not stranded, f"side effects on workflows that did not succeed: {sorted(stranded)}"
