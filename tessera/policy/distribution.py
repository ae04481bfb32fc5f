"""The policy set, distributed: the policy service administers, decision points decide.

The policy service (the administration point) validates and versions the set, then
publishes it to the policy bucket (:class:`PolicyPublisher`): key ``set`` holds the whole
:class:`~tessera.v1.policy_pb2.PolicySetSnapshot`, written when the version changes, and
key ``lease`` a :class:`~tessera.v1.policy_pb2.PolicyLease` naming the current version,
renewed every ``renew_interval_s``. Every decision point in another process (the tool
proxy with ``policy_mode = "distributed"``) follows both keys with a KV watch
(:class:`DistributedPolicySet`): a reload reaches it as soon as the policy service has
loaded it (within ``renew_interval_s`` of the reload, plus one round trip).

Freshness, failing closed: a decision point decides only while it can confirm it holds
the current set, i.e. it saw, within ``freshness_s``, a lease naming the version it holds.
A policy service that is down (no renewals), or a set announced but not yet built here
(a lease naming another version), makes :attr:`DistributedPolicySet.current` raise
UNAVAILABLE (reason ``POLICY_STALE``) once the bound has passed. Receipt times are this
process's monotonic clock, so the bound does not depend on the two hosts' clocks agreeing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import structlog
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tessera.policy.engine import LoadedPolicySet, PolicyLoadError, build_policy_set
from tessera.policy.store import PolicyStore
from tessera.runtime.bus import Topology
from tessera.runtime.errors import Unavailable
from tessera.runtime.kv_follow import BucketFollower
from tessera.v1 import policy_pb2

__all__ = ["DistributedPolicySet", "PolicyPublisher", "PolicySource", "snapshot_of"]

log = structlog.get_logger(__name__)

SET_KEY = "set"
LEASE_KEY = "lease"


class PolicySource(Protocol):
    """Where a decision point's set comes from: its own files (:class:`PolicyStore`) or
    the policy service's distribution (:class:`DistributedPolicySet`, whose ``current``
    raises UNAVAILABLE when it cannot confirm its set current)."""

    @property
    def current(self) -> LoadedPolicySet: ...


def snapshot_of(loaded: LoadedPolicySet) -> policy_pb2.PolicySetSnapshot:
    snapshot = policy_pb2.PolicySetSnapshot(
        version=loaded.version,
        schema=loaded.schema_text,
        files=[policy_pb2.PolicyFile(path=p, text=t) for p, t in loaded.files],
    )
    snapshot.load_time.FromDatetime(loaded.load_time)
    return snapshot


class PolicyPublisher:
    """The policy service's side: publishes the store's current set and renews its lease
    every ``renew_interval_s`` until :meth:`stop`. A failed write is logged and retried at
    the next renewal (decision points refuse once their bound passes meanwhile)."""

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        store: PolicyStore,
        *,
        renew_interval_s: float = 1.0,
        check_interval_s: float = 0.1,
    ) -> None:
        self._js = js
        self._topology = topology
        self._store = store
        self._renew_s = renew_interval_s
        self._check_s = check_interval_s
        self._kv: KeyValue | None = None
        self._published = ""
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> None:
        """Write the set (if its version changed) and renew the lease, now."""
        if self._kv is None:
            self._kv = await self._js.key_value(self._topology.policy_bucket)
        current = self._store.current
        if current.version != self._published:
            await self._kv.put(SET_KEY, snapshot_of(current).SerializeToString())
            self._published = current.version
            log.info("policy_set_published", version=current.version)
        lease = policy_pb2.PolicyLease(version=current.version)
        lease.renew_time.GetCurrentTime()
        lease.renew_interval.FromMilliseconds(int(self._renew_s * 1000))
        await self._kv.put(LEASE_KEY, lease.SerializeToString())

    async def start(self) -> None:
        await self.publish()
        self._task = asyncio.create_task(self._run(), name="policy-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(self._check_s)
            # A reload goes out at once; otherwise the lease is renewed on its interval.
            changed = self._store.current.version != self._published
            if not changed and time.monotonic() - renewed < self._renew_s:
                continue
            try:
                await self.publish()
                renewed = time.monotonic()
            except Exception as exc:  # NATS reconnecting: retried at the next check
                log.warning("policy_publish_failed", error=type(exc).__name__)
                self._kv = None


class DistributedPolicySet:
    """A decision point's side: the set the policy service distributes, built here, and
    served only while fresh (see the module docstring)."""

    def __init__(self, js: JetStreamContext, topology: Topology, *, freshness_s: float) -> None:
        if freshness_s <= 0:
            raise ValueError("freshness_s must be > 0")
        self._js = js
        self._topology = topology
        self.freshness_s = freshness_s
        self._loaded: LoadedPolicySet | None = None
        self._lease_version = ""
        self._confirmed_at = float("-inf")
        """When (monotonic) a lease last named the version held here."""
        self._ready = asyncio.Event()
        self._follower: BucketFollower | None = None

    @property
    def current(self) -> LoadedPolicySet:
        """The set to decide with; raises :class:`Unavailable` (``POLICY_STALE``) when it
        cannot be confirmed current within the bound."""
        loaded = self._loaded
        if loaded is None or time.monotonic() - self._confirmed_at > self.freshness_s:
            raise Unavailable(
                "the policy set cannot be confirmed current: the call is refused",
                reason="POLICY_STALE",
                retry_after_s=1.0,
                metadata={
                    "held": loaded.version if loaded is not None else "",
                    "announced": self._lease_version,
                },
            )
        return loaded

    @property
    def version(self) -> str:
        """The version held ("" before the first set arrived)."""
        return self._loaded.version if self._loaded is not None else ""

    def start(self) -> None:
        if self._follower is None:
            bucket = self._topology.policy_bucket
            self._follower = BucketFollower(self._js, bucket, self._apply)
            self._follower.start()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for a set confirmed current; whether it came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._ready.is_set()

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None

    async def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            return
        try:
            if entry.key == SET_KEY:
                snapshot = policy_pb2.PolicySetSnapshot.FromString(entry.value)
                if snapshot.version != self.version:
                    await self._build(snapshot)
            elif entry.key == LEASE_KEY:
                lease = policy_pb2.PolicyLease.FromString(entry.value)
                self._lease_version = lease.version
                if lease.version == self.version:
                    self._confirmed_at = time.monotonic()
                    self._ready.set()
        except DecodeError:
            log.error("policy_bucket_undecodable", key=entry.key)

    async def _build(self, snapshot: policy_pb2.PolicySetSnapshot) -> None:
        files = [(f.path, f.text) for f in snapshot.files]
        try:
            loaded = await asyncio.to_thread(build_policy_set, snapshot.schema, files)
        except PolicyLoadError as exc:
            # The policy service validated it: a different Cedar here. Keep what is held
            # (it goes stale: refusals say so) and let an operator look.
            log.error("policy_set_unbuildable", version=snapshot.version, errors=exc.errors[:5])
            return
        if loaded.version != snapshot.version:
            log.error("policy_set_version_mismatch", got=loaded.version, want=snapshot.version)
            return
        previous = self.version
        self._loaded = loaded
        if self._lease_version == loaded.version:  # its lease arrived before the build
            self._confirmed_at = time.monotonic()
            self._ready.set()
        log.info("policy_set_received", version=loaded.version, previous=previous or None)
