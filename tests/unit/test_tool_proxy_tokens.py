"""The token cache: hashing, TTL, accessor eviction, and the rate limiter."""

from __future__ import annotations

import pytest

from services.tool_proxy.approvals import gate_id
from services.tool_proxy.limits import RateLimiter
from services.tool_proxy.tokens import TokenChecker, check_format, token_key
from tessera.runtime.errors import ResourceExhausted, Unauthenticated, Unavailable
from tessera.vault.errors import InvalidToken, VaultUnavailable
from tessera.vault.tokens import TokenInfo

TOKEN = "s.abcdefghijklmnopqrstuvwx"


class FakeVault:
    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None

    async def lookup_token(self, token: str) -> TokenInfo:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return TokenInfo(
            accessor="acc-1",
            policies=("tool-billing-issue_refund", "tool-mcp-notes"),
            meta={"workflow": "wf", "task": "t", "agent": "billing"},
            ttl_s=60,
            num_uses=3,
            expire_time=None,
            renewable=False,
            role="tessera-task",
            orphan=False,
        )


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_is_checked_before_vault() -> None:
    with pytest.raises(Unauthenticated) as missing:
        check_format(None)
    assert missing.value.reason == "TOKEN_MISSING"
    for bad in ("short", "has space in it", "x" * 1025, "s.\u202eabcdefgh"):
        with pytest.raises(Unauthenticated) as info:
            check_format(bad)
        assert info.value.reason == "TOKEN_MALFORMED"
    assert token_key(TOKEN) != TOKEN and len(token_key(TOKEN)) == 64


async def test_lookups_are_cached_for_at_most_the_ttl() -> None:
    vault, clock = FakeVault(), Clock()
    checker = TokenChecker(vault, ttl_s=1.0, clock=clock)
    verified = await checker.verify(TOKEN)
    assert verified.tools == {"billing.issue_refund", "mcp.notes"}
    assert verified.agent == "billing"
    await checker.verify(TOKEN)
    assert vault.calls == 1
    clock.now += 1.0
    await checker.verify(TOKEN)
    assert vault.calls == 2


async def test_a_token_in_use_is_looked_up_ahead_of_its_ttl_without_the_call_waiting() -> None:
    vault, clock = FakeVault(), Clock()
    checker = TokenChecker(vault, ttl_s=1.0, clock=clock)  # refreshed from 0.75 s on
    await checker.verify(TOKEN)
    clock.now += 0.8  # past the refresh point, inside the TTL
    vault.fail = VaultUnavailable("down")  # would fail any call that waited for Vault
    verified = await checker.verify(TOKEN)  # served from the cache
    assert verified.agent == "billing"
    await checker.wait_lookups()
    assert vault.calls == 2  # ...and a lookup was made in the background
    vault.fail = None
    clock.now += 0.8  # 1.6 s: the failed refresh left the first entry, now expired
    await checker.verify(TOKEN)
    assert vault.calls == 3  # looked up by the call itself
    clock.now += 0.8  # the entry of 1.6 s is 0.8 s old: refreshed ahead, succeeding
    await checker.verify(TOKEN)
    await checker.wait_lookups()
    assert vault.calls == 4
    clock.now += 0.3  # 1.1 s after the entry of 1.6 s, 0.3 s after its refresh
    await checker.verify(TOKEN)
    assert vault.calls == 4  # served by the refreshed entry: no call waited


async def test_a_refresh_that_finds_the_token_invalid_evicts_it() -> None:
    vault, clock = FakeVault(), Clock()
    checker = TokenChecker(vault, ttl_s=1.0, clock=clock)
    await checker.verify(TOKEN)
    clock.now += 0.8
    vault.fail = InvalidToken("revoked at Vault")
    await checker.verify(TOKEN)  # still inside the TTL: served, refresh started
    await checker.wait_lookups()
    with pytest.raises(Unauthenticated) as info:
        await checker.verify(TOKEN)  # the refresh evicted it: this call asks Vault itself
    assert info.value.reason == "TOKEN_INVALID"


async def test_revocation_evicts_and_denies_at_once() -> None:
    vault, clock = FakeVault(), Clock()
    checker = TokenChecker(vault, clock=clock)
    await checker.verify(TOKEN)
    assert checker.evict_accessors(["acc-1"]) == 1
    with pytest.raises(Unauthenticated):
        await checker.verify(TOKEN)  # Vault still says valid: the deny list wins


async def test_vault_answers_map_to_fail_closed_statuses() -> None:
    vault = FakeVault()
    checker = TokenChecker(vault)
    vault.fail = InvalidToken("x")
    with pytest.raises(Unauthenticated) as invalid:
        await checker.verify(TOKEN)
    assert invalid.value.reason == "TOKEN_INVALID"
    vault.fail = VaultUnavailable("x")
    with pytest.raises(Unavailable) as down:
        await checker.verify(TOKEN)
    assert down.value.reason == "VAULT_UNAVAILABLE"


def test_rate_limits_per_agent_and_tool() -> None:
    clock = Clock()
    limiter = RateLimiter(agent_rate=1, agent_burst=2, tool_rate=100, tool_burst=100, clock=clock)
    limiter.acquire(agent="a", tool="t")
    limiter.acquire(agent="a", tool="t")
    with pytest.raises(ResourceExhausted) as info:
        limiter.acquire(agent="a", tool="t")
    assert info.value.retry_after_s == pytest.approx(1.0)
    limiter.acquire(agent="b", tool="t")  # another agent has its own bucket
    clock.now += 1.0
    limiter.acquire(agent="a", tool="t")


def test_gate_id_is_the_cross_service_contract() -> None:
    import hashlib

    expected = "tool-" + hashlib.sha256(b"t-1|billing.issue_refund|k-1").hexdigest()[:16]
    assert gate_id("t-1", "billing.issue_refund", "k-1") == expected
