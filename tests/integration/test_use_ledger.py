"""The tool proxy's per-token use ledger on the real NATS KV: replicas together never exceed a
token's budget, small budgets are exact, and large ones are spent in leased blocks (few
writes)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from nats.js.kv import KeyValue

from services.tool_proxy.tokens import UseLedger, VerifiedToken
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import Unauthenticated
from tessera.vault.tokens import TokenInfo


def task_token(num_uses: int) -> VerifiedToken:
    info = TokenInfo(
        accessor="acc-" + secrets.token_hex(8),
        policies=("tool-kb-search",),
        meta={"workflow": "wf", "task": "t", "agent": "support"},
        ttl_s=60,
        num_uses=num_uses,
        expire_time=None,
        renewable=False,
        role="tessera-task",
        orphan=False,
    )
    return VerifiedToken(key="k", info=info, tools=frozenset({"kb.search"}), expires_mono=None)


async def spend_all(ledgers: list[UseLedger], token: VerifiedToken, attempts: int) -> int:
    """Round-robin ``attempts`` calls over ``ledgers``; how many were allowed."""
    allowed = 0
    for i in range(attempts):
        try:
            await ledgers[i % len(ledgers)].spend(token)
        except Unauthenticated as exc:
            assert exc.reason == "TOKEN_USES_EXHAUSTED"
        else:
            allowed += 1
    return allowed


class CountingKV:
    """The real bucket, counting the ledger's writes."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.writes = 0

    async def create(self, key: str, value: bytes) -> int:
        self.writes += 1
        return await self._kv.create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.writes += 1
        return await self._kv.update(key, value, last=last)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


@pytest.fixture
async def kv(nats_url: str, namespace: str) -> Any:
    nc = await connect(nats_url, name="test-use-ledger")
    js = nc.jetstream()
    topology = Topology(namespace)
    await declare(js, topology)
    # The bucket the tool proxy keeps its ledger in (services/tool_proxy/app.py).
    yield CountingKV(await js.key_value(topology.idempotency_bucket))
    await nc.close()


async def test_one_replica_spends_exactly_the_budget_in_few_writes(kv: CountingKV) -> None:
    ledger, token = UseLedger(kv), task_token(200)  # type: ignore[arg-type]
    left = [await ledger.spend(token) for _ in range(200)]
    assert left == list(range(199, -1, -1))  # exact count, as the caller sees it
    with pytest.raises(Unauthenticated) as exhausted:
        await ledger.spend(token)
    assert exhausted.value.reason == "TOKEN_USES_EXHAUSTED"
    # Leased blocks while ≥ 16 were left, then one write per use: far fewer than 200.
    assert kv.writes < 40


async def test_replicas_together_never_exceed_the_budget(kv: CountingKV) -> None:
    replicas = [UseLedger(kv), UseLedger(kv), UseLedger(kv)]  # type: ignore[arg-type]
    for budget in (5, 15, 40, 300):
        token = task_token(budget)
        allowed = await spend_all(replicas, token, attempts=2 * budget)
        assert allowed <= budget
        if budget < UseLedger.LEASE_FROM:
            assert allowed == budget  # small budgets are exact
        else:
            # Only the replicas' unspent leases are lost, a few uses at most here.
            assert allowed >= budget - 3 * (UseLedger.LEASE_FROM - 1)


async def test_a_given_back_use_is_spent_again_without_a_write(kv: CountingKV) -> None:
    ledger, token = UseLedger(kv), task_token(100)  # type: ignore[arg-type]
    assert await ledger.spend(token) == 99
    await ledger.give_back(token)  # e.g. the policy denied the call
    assert await ledger.spend(token) == 99
    assert kv.writes == 1  # the lease taken by the first call


async def test_a_small_budget_give_back_is_written(kv: CountingKV) -> None:
    first, second = UseLedger(kv), UseLedger(kv)  # type: ignore[arg-type]
    token = task_token(2)
    await first.spend(token)
    await first.spend(token)
    with pytest.raises(Unauthenticated):
        await second.spend(token)
    await first.give_back(token)  # visible to the other replica at once
    assert await second.spend(token) == 0


async def test_a_forgotten_ledger_is_read_again_and_still_bounds_the_token(
    kv: CountingKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.tool_proxy.tokens._MAX_LEDGERS", 2)
    ledger = UseLedger(kv)  # type: ignore[arg-type]
    first, others = task_token(3), [task_token(3) for _ in range(3)]
    await ledger.spend(first)
    await ledger.spend(first)
    for token in others:  # pushes the first token's ledger out of memory
        await ledger.spend(token)
    assert await ledger.spend(first) == 0  # read back from the KV, not started afresh
    with pytest.raises(Unauthenticated):
        await ledger.spend(first)
