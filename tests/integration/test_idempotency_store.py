"""The tool proxy's idempotency records on the real NATS KV: a claim is held for its
executor's backend deadline (plus a margin), then a retry may take it over once the
backend says the effect did not happen."""

from __future__ import annotations

from typing import Any

import pytest

from services.tool_proxy.idempotency import Claim, IdempotencyStore, Replay, effect_id
from services.tool_proxy.tools import EffectLookup
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import Aborted, FailedPrecondition, Unavailable


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
        call: dict[str, Any] = {
            "tool": "billing.issue_refund",
            "arguments_digest": "d1",
            "decision_id": "x",
        }

        first = await store.begin(eid, **call, lease_s=5.0)  # then its replica is killed
        assert isinstance(first, Claim)

        clock.now += 1.0
        with pytest.raises(Aborted) as refused:
            await store.begin(eid, **call, lease_s=5.0)
        assert refused.value.reason == "IDEMPOTENCY_IN_PROGRESS"
        assert refused.value.retry_after_s == pytest.approx(4.0)  # when the lease ends

        clock.now += 4.0
        with pytest.raises(FailedPrecondition) as unknown:
            await store.begin(eid, **call, lease_s=5.0)  # nobody can tell if it ran
        assert unknown.value.reason == "EFFECT_OUTCOME_UNKNOWN"
        assert unknown.value.metadata == {"tool": call["tool"], "effect_id": eid}

        asked: list[float] = []

        async def never_ran(claimed_at: float) -> EffectLookup:
            asked.append(claimed_at)
            return EffectLookup.not_executed()

        second = await store.begin(eid, **call, lease_s=5.0, lookup=never_ran)
        assert isinstance(second, Claim) and second.revision != first.revision
        assert asked == [1_000.0]  # when the effect was first claimed
        await store.finish(
            second, tool=call["tool"], arguments_digest="d1", result={"ok": 1}, decision_id="y"
        )
        replay = await store.begin(eid, **call, lease_s=5.0)
        assert isinstance(replay, Replay) and replay.result == {"ok": 1}
    finally:
        await nc.close()


async def test_a_takeover_waits_for_an_answer_and_remembers_the_first_claim(
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
        eid = effect_id("wf-2", "email.send", "k-2")
        call: dict[str, Any] = {"tool": "email.send", "arguments_digest": "d2", "decision_id": "x"}
        asked: list[float] = []

        async def unreachable(claimed_at: float) -> EffectLookup:
            raise ConnectionError("backend down")

        async def never_ran(claimed_at: float) -> EffectLookup:
            asked.append(claimed_at)
            return EffectLookup.not_executed()

        async def ran(claimed_at: float) -> EffectLookup:
            asked.append(claimed_at)
            return EffectLookup.executed({"message_id": "m-1"})

        assert isinstance(await store.begin(eid, **call, lease_s=5.0), Claim)
        clock.now += 10.0
        with pytest.raises(Unavailable) as down:
            await store.begin(eid, **call, lease_s=5.0, lookup=unreachable)
        assert down.value.reason == "EFFECT_LOOKUP_UNAVAILABLE"

        # The record was left as it was: the next retry asks again and takes over.
        assert isinstance(await store.begin(eid, **call, lease_s=5.0, lookup=never_ran), Claim)
        clock.now += 10.0  # that executor died too, after its effect
        replay = await store.begin(eid, **call, lease_s=5.0, lookup=ran)
        assert isinstance(replay, Replay) and replay.recovered
        assert replay.result == {"message_id": "m-1"}
        assert asked == [1_000.0, 1_000.0]  # both lookups reach back to the first claim
        again = await store.begin(eid, **call, lease_s=5.0)
        assert isinstance(again, Replay) and not again.recovered
        assert again.result == {"message_id": "m-1"}
    finally:
        await nc.close()
