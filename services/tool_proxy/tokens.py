"""Task-token checks: format, a ≤ 1 s lookup cache evicted by revocation events, and the
per-token call budget.

Refresh ahead: an entry older than ``refresh_after_s`` (3/4 of the TTL by default) is still
served, and the call that finds it starts one lookup in the background, so a token in
steady use is looked up about every 0.75 s and its calls never wait for Vault; a token
idle for longer than the TTL is looked up by its next call, as before (~1.1 ms on the
benchmark's machine: ``vault_token_lookup``). The bound on staleness is
unchanged: no entry is served past the TTL, and a background lookup that finds the token
invalid evicts it.

The cache is keyed by SHA-256 of the token, never the token. An accessor index maps each
cached token's accessor to its cache key, so a ``TokenRevoked`` event (which lists
accessors) evicts at once; the accessor also goes on a deny list for the longest task-token
lifetime, so a lookup that raced the revocation cannot put the token back.

Use budget: every Vault request made with a task token consumes one of its uses, refused
ones included. The proxy makes at most one (the secret read) per call, and serves secrets
from a short cache, so Vault's own counter cannot bound the number of calls by itself.
:class:`UseLedger` therefore counts governed calls per token in NATS KV (shared by all
replicas, compare-and-set): the budget is the ``num_uses`` Vault reported the first time any
replica saw the token, and every call that reaches execution spends one. A token created
with ``num_uses = N`` thus allows at most N executed tool calls. Vault's counter only ever
moves slower than the ledger (one use per secret-cache miss), so it never runs out first.

Leases: a compare-and-set is an fsynced write on every call's critical path, so while many
uses are left (at least ``LEASE_FROM``) a replica takes a block of them in one write (an
eighth of what is left, at most ``LEASE_MAX``) and spends it locally. The ledger counts a
leased use as spent, so all replicas together still never exceed the budget; what a lease
costs is strictness the other way: uses leased by a replica that stops receiving the
token's calls (or dies) are lost, so another replica may refuse a call before the token's
last use. Below ``LEASE_FROM`` every use is its own write, so small budgets (the common
task token) stay exact. A revocation drops the lease with the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tessera.runtime.bus import subscribe_events
from tessera.runtime.errors import Unauthenticated, Unavailable
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import events_pb2
from tessera.vault.errors import InvalidToken, VaultPermissionDenied, VaultUnavailable
from tessera.vault.naming import TOOL_POLICY_PREFIX
from tessera.vault.tokens import TokenInfo

__all__ = [
    "TokenChecker",
    "TokenLookup",
    "UseLedger",
    "VerifiedToken",
    "check_format",
    "token_key",
]

log = structlog.get_logger(__name__)

_TOKEN_RE = re.compile(r"^[A-Za-z0-9._\-]{8,1024}$")
_REVOKED_MEMORY_S = 20 * 60.0
"""How long a revoked accessor stays denied (above the 15 min task-token ceiling)."""
_MAX_REVOKED = 100_000
_LEDGER_ATTEMPTS = 64
_MAX_LEDGERS = 100_000
"""Token ledgers a replica remembers (their revision and lease), least recently used out."""


class TokenLookup(Protocol):
    async def lookup_token(self, token: str) -> TokenInfo: ...


def token_key(token: str) -> str:
    """The cache key of ``token``: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_format(token: str | None) -> str:
    """The token if it is well-formed; UNAUTHENTICATED otherwise (before any Vault call)."""
    if not token:
        raise Unauthenticated(f"missing {TASK_TOKEN_METADATA} metadata", reason="TOKEN_MISSING")
    if not _TOKEN_RE.fullmatch(token):
        raise Unauthenticated("malformed task token", reason="TOKEN_MALFORMED")
    return token


def _tool_names(policies: Iterable[str]) -> frozenset[str]:
    # tool-<slug> where slug = tool with '.' -> '-'; tool names never contain '-'.
    return frozenset(
        p[len(TOOL_POLICY_PREFIX) :].replace("-", ".")
        for p in policies
        if p.startswith(TOOL_POLICY_PREFIX)
    )


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token Vault vouched for less than a second ago. Never holds the token itself."""

    key: str
    info: TokenInfo
    tools: frozenset[str]
    """Tool (scope) names its policies grant."""
    expires_mono: float | None

    @property
    def agent(self) -> str:
        return self.info.meta.get("agent", "")

    @property
    def workflow(self) -> str:
        return self.info.meta.get("workflow", "")

    @property
    def task(self) -> str:
        return self.info.meta.get("task", "")


@dataclass(slots=True)
class _Entry:
    token: VerifiedToken
    fetched: float


class TokenChecker:
    """Looks task tokens up with the proxy's own Vault identity, caching for ``ttl_s``."""

    def __init__(
        self,
        vault: TokenLookup,
        *,
        ttl_s: float = 1.0,
        refresh_after_s: float | None = None,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < ttl_s <= 1.0:
            raise ValueError("ttl_s must be in (0, 1]")
        refresh = ttl_s * 0.75 if refresh_after_s is None else refresh_after_s
        if not 0 < refresh <= ttl_s:
            raise ValueError("refresh_after_s must be in (0, ttl_s]")
        self._vault = vault
        self._ttl = ttl_s
        self._refresh_after = refresh
        self._max = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._by_accessor: dict[str, str] = {}
        self._revoked: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[VerifiedToken]] = {}
        """cache key -> the one lookup of that token under way (its callers share it)."""
        self._lookups: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._on_revoked: list[Callable[[Iterable[str]], Awaitable[None]]] = []

    # -- verification ---------------------------------------------------------------
    async def verify(self, token: str) -> VerifiedToken:
        """The token's verified identity. UNAUTHENTICATED (TOKEN_INVALID) for unknown,
        expired, revoked or used-up tokens; UNAVAILABLE (VAULT_UNAVAILABLE) when Vault
        cannot answer."""
        key = token_key(token)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and now - entry.fetched < self._ttl:
            if now - entry.fetched >= self._refresh_after and key not in self._inflight:
                self._start_lookup(token, key)  # ahead of the TTL; this call does not wait
            return self._still_valid(entry.token, now)
        pending = self._inflight.get(key) or self._start_lookup(token, key)
        # Shielded: a caller that goes away does not cancel the lookup others share.
        return self._still_valid(await asyncio.shield(pending), self._clock())

    async def wait_lookups(self) -> None:
        """Wait until no lookup is under way (those started meanwhile included)."""
        while self._lookups:
            await asyncio.gather(*self._lookups, return_exceptions=True)

    def _start_lookup(self, token: str, key: str) -> asyncio.Future[VerifiedToken]:
        """One lookup of ``token`` in a task of its own; its future, shared by every caller
        meanwhile."""
        future: asyncio.Future[VerifiedToken] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future

        async def run() -> None:
            try:
                future.set_result(await self._lookup(token, key))
            except Unauthenticated as exc:
                self._evict_key(key)  # revoked, expired or used up: no longer served
                _fail(future, exc)
            except BaseException as exc:
                # Vault unreachable: a cached entry is still served up to its TTL, then
                # the next call looks the token up itself (and fails closed).
                _fail(future, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                self._inflight.pop(key, None)

        task = asyncio.create_task(run(), name="task-token-lookup")
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        return future

    def _still_valid(self, token: VerifiedToken, now: float) -> VerifiedToken:
        if token.info.accessor in self._revoked:
            self._evict_key(token.key)
            raise Unauthenticated("task token was revoked", reason="TOKEN_INVALID")
        if token.expires_mono is not None and now >= token.expires_mono:
            self._evict_key(token.key)
            raise Unauthenticated("task token expired", reason="TOKEN_INVALID")
        return token

    async def _lookup(self, token: str, key: str) -> VerifiedToken:
        started = self._clock()
        try:
            info = await self._vault.lookup_token(token)
        except InvalidToken:
            raise Unauthenticated(
                "task token is invalid, expired, revoked or used up", reason="TOKEN_INVALID"
            ) from None
        except VaultUnavailable:
            raise Unavailable(
                "Vault unreachable: cannot verify the task token",
                reason="VAULT_UNAVAILABLE",
                retry_after_s=1.0,
            ) from None
        except VaultPermissionDenied:
            log.error("tool_proxy_cannot_lookup_tokens")
            raise Unavailable(
                "the tool proxy cannot verify tokens", reason="VAULT_UNAVAILABLE"
            ) from None
        expires = None if info.expire_time is None else started + max(info.ttl_s, 0)
        verified = VerifiedToken(
            key=key, info=info, tools=_tool_names(info.policies), expires_mono=expires
        )
        if info.accessor in self._revoked:
            raise Unauthenticated("task token was revoked", reason="TOKEN_INVALID")
        self._cache[key] = _Entry(verified, started)
        self._cache.move_to_end(key)
        if info.accessor:
            self._by_accessor[info.accessor] = key
        while len(self._cache) > self._max:
            _, old = self._cache.popitem(last=False)
            self._by_accessor.pop(old.token.info.accessor, None)
        return verified

    def _evict_key(self, key: str) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._by_accessor.pop(entry.token.info.accessor, None)

    # -- revocation -----------------------------------------------------------------
    def evict_accessors(self, accessors: Iterable[str]) -> int:
        """Forget and deny the tokens behind ``accessors`` at once; how many were cached."""
        now = self._clock()
        evicted = 0
        for accessor in accessors:
            if not accessor:
                continue
            self._revoked[accessor] = now
            self._revoked.move_to_end(accessor)
            key = self._by_accessor.pop(accessor, None)
            if key is not None and self._cache.pop(key, None) is not None:
                evicted += 1
        while self._revoked and (
            len(self._revoked) > _MAX_REVOKED
            or now - next(iter(self._revoked.values())) > _REVOKED_MEMORY_S
        ):
            self._revoked.popitem(last=False)
        return evicted

    def on_revoked(self, callback: Callable[[Iterable[str]], Awaitable[None]]) -> None:
        """Also run ``callback(accessors)`` for every revocation event."""
        self._on_revoked.append(callback)

    async def subscribe(self, nc: Client, subject: str) -> None:
        """Evict on every ``TokenRevoked`` (serialized protobuf) published on ``subject``."""

        async def handle(event: events_pb2.TokenRevoked) -> None:
            evicted = self.evict_accessors(event.accessors)
            log.info(
                "task_tokens_evicted",
                workflow_id=event.workflow_id,
                accessors=len(event.accessors),
                cached=evicted,
            )
            for callback in self._on_revoked:
                try:
                    await callback(list(event.accessors))
                except Exception as exc:
                    log.warning("token_revoked_callback_failed", error=repr(exc))

        self._sub = await subscribe_events(nc, subject, events_pb2.TokenRevoked, handle)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._lookups):
            task.cancel()
        await asyncio.gather(*self._lookups, return_exceptions=True)


def _fail(future: asyncio.Future[VerifiedToken], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
        return
    future.set_exception(exc)
    future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"


class UseLedger:
    """Counts executed calls per task token in NATS KV (see the module docstring)."""

    PREFIX = "uses."
    LEASE_FROM = 16
    """Uses left (in the ledger) from which a replica leases a block instead of one."""
    LEASE_MAX = 64

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._last: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        """ledger key -> (revision, budget, used) last seen by this replica, least recently
        written first (bounded: tokens expire, their entries would not)."""
        self._leased: dict[str, int] = {}
        """ledger key -> uses counted as spent in the ledger but not yet spent here."""

    @classmethod
    def lease_size(cls, left: int) -> int:
        """How many uses one ledger write takes when ``left`` (≥ 1) are left."""
        if left < cls.LEASE_FROM:
            return 1
        return min(cls.LEASE_MAX, left // 8)

    @staticmethod
    def key(accessor: str) -> str:
        return UseLedger.PREFIX + hashlib.sha256(accessor.encode()).hexdigest()[:40]

    async def spend(self, token: VerifiedToken) -> int:
        """Spend one call of ``token``'s budget; the calls left afterwards.

        Raises UNAUTHENTICATED (TOKEN_USES_EXHAUSTED) when none is left; UNAVAILABLE when
        the ledger cannot be written (fail closed). Tokens without a use limit are not
        counted (-1 is returned).
        """
        key = self.key(token.info.accessor)
        try:
            for _ in range(_LEDGER_ATTEMPTS):
                left = self._spend_leased(token)  # maybe leased meanwhile by a racing call
                if left is not None:
                    return left
                seen = self._last.get(key)
                if seen is None:
                    if token.info.num_uses <= 0:
                        return -1
                    budget = token.info.num_uses
                    take = self.lease_size(budget)
                    try:
                        rev = await self._kv.create(key, _ledger_value(budget, take))
                    except KeyWrongLastSequenceError:
                        await self._refresh(key)
                        continue
                    self._took(key, (rev, budget, take), take)
                    return self._left(key)
                rev, budget, used = seen
                if used >= budget:
                    await self._refresh(key)
                    latest = self._last.get(key)
                    if latest is not None and latest[2] >= latest[1]:
                        raise Unauthenticated(
                            "task token has no uses left", reason="TOKEN_USES_EXHAUSTED"
                        )
                    continue
                take = self.lease_size(budget - used)
                try:
                    new_rev = await self._kv.update(
                        key, _ledger_value(budget, used + take), last=rev
                    )
                except KeyWrongLastSequenceError:
                    await self._refresh(key)
                    continue
                self._took(key, (new_rev, budget, used + take), take)
                return self._left(key)
        except (Unauthenticated, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.warning("use_ledger_unavailable", error=repr(exc))
            raise Unavailable(
                "cannot account the token's use", reason="LEDGER_UNAVAILABLE", retry_after_s=0.5
            ) from None
        raise Unavailable(
            "too much contention on the token's use ledger",
            reason="LEDGER_CONTENDED",
            retry_after_s=0.1,
        )

    def reserve(self, token: VerifiedToken) -> asyncio.Future[int]:
        """:meth:`spend` as a future the caller can overlap with other work: already done
        when this replica's lease has a use (no write, no task)."""
        left = self._spend_leased(token)
        if left is None:
            return asyncio.ensure_future(self.spend(token))
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(left)
        return done

    def _spend_leased(self, token: VerifiedToken) -> int | None:
        """Spend one use from this replica's lease without a write, if it holds one; the
        calls left, or None (then :meth:`spend` must write)."""
        key = self.key(token.info.accessor)
        leased = self._leased.get(key, 0)
        if leased <= 0:
            return None
        self._leased[key] = leased - 1
        return self._left(key)

    async def give_back(self, token: VerifiedToken) -> None:
        """Return one call spent by :meth:`spend` for a call that did not execute (denied,
        replayed, refused before execution). Best effort: a failure is logged and the use
        stays spent, which only ever shrinks the budget."""
        if token.info.num_uses <= 0:
            return
        key = self.key(token.info.accessor)
        if key in self._leased:  # back into this replica's lease: no write
            self._leased[key] += 1
            return
        try:
            for _ in range(_LEDGER_ATTEMPTS):
                seen = self._last.get(key)
                if seen is None:
                    await self._refresh(key)
                    seen = self._last.get(key)
                    if seen is None:
                        return  # purged (revoked): nothing to give back
                rev, budget, used = seen
                if used <= 0:
                    return
                try:
                    new_rev = await self._kv.update(key, _ledger_value(budget, used - 1), last=rev)
                except KeyWrongLastSequenceError:
                    await self._refresh(key)
                    continue
                self._remember(key, (new_rev, budget, used - 1))
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("use_ledger_give_back_failed", error=repr(exc))
            return
        log.warning("use_ledger_give_back_contended")

    def _took(self, key: str, seen: tuple[int, int, int], take: int) -> None:
        """Record a successful write that spent ``take`` uses: one for this call, the
        rest leased (kept only if they are more than nothing)."""
        self._remember(key, seen)
        leased = self._leased.get(key, 0) + take - 1
        if leased > 0 or key in self._leased:
            self._leased[key] = leased

    def _remember(self, key: str, seen: tuple[int, int, int]) -> None:
        self._last[key] = seen
        self._last.move_to_end(key)
        while len(self._last) > _MAX_LEDGERS:
            # Long unused (its token most likely expired): a later call re-reads the
            # ledger; a lease still held is given up, which only shrinks the budget.
            old, _ = self._last.popitem(last=False)
            self._leased.pop(old, None)

    def _left(self, key: str) -> int:
        """Uses left for the token as this replica sees it (its lease included)."""
        leased = self._leased.get(key, 0)
        seen = self._last.get(key)
        return leased if seen is None else seen[1] - seen[2] + leased

    async def _refresh(self, key: str) -> None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:  # purged: the token was revoked
            self._last.pop(key, None)
            self._leased.pop(key, None)
            return
        data = json.loads(entry.value or b"{}")
        self._remember(key, (int(entry.revision or 0), int(data["budget"]), int(data["used"])))

    async def forget(self, accessors: Iterable[str]) -> None:
        """Drop the ledgers of revoked tokens (they can never be used again)."""
        for accessor in accessors:
            key = self.key(accessor)
            self._last.pop(key, None)
            self._leased.pop(key, None)
            try:
                await self._kv.purge(key)
            except Exception as exc:
                log.debug("use_ledger_purge_failed", error=repr(exc))


def _ledger_value(budget: int, used: int) -> bytes:
    return json.dumps({"budget": budget, "used": used}).encode()
