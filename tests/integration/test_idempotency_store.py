"""The tool proxy's idempotency records on the real NATS KV: a claim is held for its
executor's backend deadline (plus a margin), then a retry may take it over."""

from __future__ import annotations

import pytest

from services.tool_proxy.idempotency import Claim, IdempotencyStore, Replay, effect_id
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import Aborted


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_dead_executors_claim_is_taken_over_when_its_lease_ends(
    nats_url: str, namespace: str
) -> None:
    nc = await connect(nats_url, name="test-idempotency")
    try:
        js = nc.jetstream()
        topology = Topology(namespace)
        await declare(js, topology)
        kv = await js.key_value(topology.idempotency_bucket)
        clock = Clock()
        store = IdempotencyStore(kv, lease_s=60.0, clock=clock)
        eid = effect_id("wf-1", "billing.issue_refund", "k-1")
        call = {"tool": "billing.issue_refund", "arguments_digest": "d1", "decision_id": "x"}

        first = await store.begin(eid, **call, lease_s=5.0)  # then its replica is killed
        assert isinstance(first, Claim)

        clock.now += 1.0
        with pytest.raises(Aborted) as refused:
            await store.begin(eid, **call, lease_s=5.0)
        assert refused.value.reason == "IDEMPOTENCY_IN_PROGRESS"
        assert refused.value.retry_after_s == pytest.approx(4.0)  # when the lease ends

        clock.now += 4.0
        second = await store.begin(eid, **call, lease_s=5.0)
        assert isinstance(second, Claim) and second.revision != first.revision
        await store.finish(
            second, tool=call["tool"], arguments_digest="d1", result={"ok": 1}, decision_id="y"
        )
        replay = await store.begin(eid, **call, lease_s=5.0)
        assert isinstance(replay, Replay) and replay.result == {"ok": 1}
    finally:
        await nc.close()
