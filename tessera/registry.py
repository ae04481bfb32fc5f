"""The live service registry: agent replicas and their capability contracts in NATS KV.

Each running agent replica owns one key, ``agent.<agent_name>.<instance_id>``, whose value
is its serialized :class:`tessera.v1.agent_pb2.AgentDescriptor` with ``heartbeat_time`` set
on every put. The registry service (services/registry) is the only writer: a replica
re-registers over gRPC every ``ttl/3`` and deregisters on a graceful stop; one that dies
simply stops refreshing its entry.

The bucket's max age (``Topology.registry_ttl_s``) eventually removes stale entries, but
that expiry emits no delete marker, so every reader here also filters on
``heartbeat_time``: an entry older than the TTL is treated as gone, whatever the bucket
still holds. :meth:`Registry.watch` turns that into explicit ``delete`` notifications.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

import nats.errors
import structlog
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tessera import semver
from tessera.runtime.bus import Topology
from tessera.v1 import agent_pb2, common_pb2

__all__ = ["Registry", "RegistryChange", "registry_key"]

log = structlog.get_logger(__name__)

_PREFIX = "agent."


def registry_key(agent_name: str, instance_id: str) -> str:
    """The KV key of one replica: ``agent.<agent_name>.<instance_id>``."""
    for label, value in (("agent name", agent_name), ("instance id", instance_id)):
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"{label} {value!r}: use letters, digits, '-' and '_' only")
    return f"{_PREFIX}{agent_name}.{instance_id}"


@dataclass(frozen=True)
class RegistryChange:
    """One change of the live set of replicas.

    ``put``: a replica appeared or changed what it offers (``descriptor`` is set);
    heartbeats that change nothing are not reported. ``delete``: a replica left
    (deregistered) or its heartbeat went stale (``expired`` is true); ``descriptor`` is its
    last known descriptor when there was one.
    """

    kind: Literal["put", "delete"]
    key: str
    agent_name: str
    instance_id: str
    descriptor: agent_pb2.AgentDescriptor | None = None
    expired: bool = False


def _split_key(key: str) -> tuple[str, str]:
    _, _, rest = key.partition(_PREFIX)
    name, _, instance = rest.partition(".")
    return name, instance


def _without_heartbeat(descriptor: agent_pb2.AgentDescriptor) -> bytes:
    copy = agent_pb2.AgentDescriptor()
    copy.CopyFrom(descriptor)
    copy.ClearField("heartbeat_time")
    return copy.SerializeToString(deterministic=True)


class Registry:
    """Reads and writes the registry bucket of ``topology`` (it must exist: see
    :func:`tessera.runtime.bus.declare`). Cheap to construct; opens the bucket lazily."""

    def __init__(
        self, js: JetStreamContext, topology: Topology, *, max_staleness_s: float = 0.0
    ) -> None:
        """``max_staleness_s``: reuse a snapshot this young instead of reading NATS again
        (hot paths such as dispatch set it; 0 reads every time)."""
        self._js = js
        self.topology = topology
        self.ttl_s: float = topology.registry_ttl_s
        self.max_staleness_s = max_staleness_s
        self._kv: KeyValue | None = None
        self._cached: tuple[float, dict[str, agent_pb2.AgentDescriptor]] | None = None
        self._printed: tuple[int, frozenset[str], str] | None = None
        """(snapshot id, fresh keys, fingerprint) last computed."""

    def invalidate(self) -> None:
        """Forget the cached snapshot (e.g. after a replica turned out to be gone)."""
        self._cached = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(self.topology.registry_bucket)
        return self._kv

    def _fresh(self, descriptor: agent_pb2.AgentDescriptor, now: float | None = None) -> bool:
        if not descriptor.HasField("heartbeat_time"):
            return False
        beat = descriptor.heartbeat_time.seconds + descriptor.heartbeat_time.nanos / 1e9
        return (time.time() if now is None else now) - beat < self.ttl_s

    # -- writes ---------------------------------------------------------------------------

    async def register(self, descriptor: agent_pb2.AgentDescriptor) -> int:
        """Put ``descriptor`` (``name`` and ``instance_id`` required) with
        ``heartbeat_time`` = now; returns the KV revision. Also the heartbeat itself."""
        key = registry_key(descriptor.name, descriptor.instance_id)
        self._cached = None
        entry = agent_pb2.AgentDescriptor()
        entry.CopyFrom(descriptor)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        entry.heartbeat_time.CopyFrom(now)
        kv = await self._bucket()
        revision: int = await kv.put(key, entry.SerializeToString())
        return revision

    async def deregister(self, descriptor: agent_pb2.AgentDescriptor) -> None:
        """Delete the replica's key (a delete marker watchers see at once)."""
        self._cached = None
        kv = await self._bucket()
        await kv.delete(registry_key(descriptor.name, descriptor.instance_id))

    async def deregister_agent(self, agent_name: str) -> int:
        """Delete every replica entry of ``agent_name`` (fresh or not); how many."""
        self._cached = None
        kv = await self._bucket()
        removed = 0
        for key in await self._read_all():
            if _split_key(key)[0] == agent_name:
                await kv.delete(key)
                removed += 1
        self._cached = None
        return removed

    # -- reads ----------------------------------------------------------------------------

    async def _snapshot(self) -> dict[str, agent_pb2.AgentDescriptor]:
        """Every current (non-deleted, decodable) entry, fresh or not; none while the
        bucket does not exist yet (nobody registered)."""
        if self._cached is not None and self.max_staleness_s > 0:
            taken, entries = self._cached
            if time.monotonic() - taken < self.max_staleness_s:
                return entries
        entries = await self._read_all()
        self._cached = (time.monotonic(), entries)
        return entries

    async def _read_all(self) -> dict[str, agent_pb2.AgentDescriptor]:
        # The stream's per-subject index is authoritative; a KV watcher may signal "no
        # more pending" before it has handed over entries already delivered.
        try:
            kv = await self._bucket()
        except BucketNotFoundError:
            return {}
        stream = f"KV_{self.topology.registry_bucket}"
        prefix = f"$KV.{self.topology.registry_bucket}."
        info = await self._js.stream_info(stream, subjects_filter=f"{prefix}{_PREFIX}>")
        keys = [subject[len(prefix) :] for subject in (info.state.subjects or {})]
        entries: dict[str, agent_pb2.AgentDescriptor] = {}
        for key in keys:
            try:
                entry = await kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                continue
            descriptor = _decode(entry.key, entry.value)
            if descriptor is not None:
                entries[entry.key] = descriptor
        return entries

    async def fingerprint(self) -> str:
        """What changes whenever the offer changes: an agent (re)registered with other
        capabilities, left, or stopped heartbeating (heartbeats alone do not change it).
        A cache of decisions taken on the registry (validated plans) keys on it."""
        now = time.time()
        entries = await self._snapshot()
        fresh = frozenset(k for k, d in entries.items() if self._fresh(d, now))
        if self._printed is not None and self._printed[:2] == (id(entries), fresh):
            return self._printed[2]
        digest = hashlib.sha256()
        for key in sorted(fresh):
            digest.update(key.encode())
            digest.update(hashlib.sha256(_without_heartbeat(entries[key])).digest())
        self._printed = (id(entries), fresh, digest.hexdigest())
        return self._printed[2]

    async def agents(self) -> list[agent_pb2.AgentDescriptor]:
        """Live replicas (heartbeat within the TTL), ordered by agent name, instance id."""
        now = time.time()
        live = [d for d in (await self._snapshot()).values() if self._fresh(d, now)]
        return sorted(live, key=lambda d: (d.name, d.instance_id))

    async def find(
        self, capability: str, constraint: str = ""
    ) -> list[tuple[agent_pb2.AgentDescriptor, common_pb2.CapabilityContract]]:
        """Live replicas offering ``capability`` at a version meeting ``constraint`` (see
        :mod:`tessera.semver`; empty means any), highest version first, then by instance
        id. Raises ``ValueError`` on a malformed constraint. Contracts with an invalid
        version are skipped (and logged)."""
        wanted = semver.parse_constraint(constraint)
        found: list[tuple[agent_pb2.AgentDescriptor, common_pb2.CapabilityContract]] = []
        for descriptor in await self.agents():
            for contract in descriptor.capabilities:
                if contract.name != capability:
                    continue
                try:
                    version = semver.parse(contract.version)
                except ValueError:
                    log.warning(
                        "registry_bad_contract_version",
                        agent=descriptor.name,
                        instance_id=descriptor.instance_id,
                        capability=contract.name,
                        version=contract.version,
                    )
                    continue
                if wanted.allows(version):
                    found.append((descriptor, contract))
        found.sort(key=lambda item: item[0].instance_id)
        found.sort(key=lambda item: semver.parse(item[1].version), reverse=True)  # stable
        return found

    async def capabilities(self) -> dict[str, list[common_pb2.CapabilityContract]]:
        """Capability name → the distinct contracts live replicas offer, highest version
        first (identical contracts from several replicas appear once)."""
        seen: dict[str, dict[bytes, common_pb2.CapabilityContract]] = {}
        for descriptor in await self.agents():
            for contract in descriptor.capabilities:
                by_bytes = seen.setdefault(contract.name, {})
                by_bytes.setdefault(contract.SerializeToString(deterministic=True), contract)

        def version_of(contract: common_pb2.CapabilityContract) -> semver.Version:
            try:
                return semver.parse(contract.version)
            except ValueError:
                return semver.Version(0, 0, 0, ("invalid",))

        return {
            name: sorted(contracts.values(), key=version_of, reverse=True)
            for name, contracts in sorted(seen.items())
        }

    async def watch(
        self, *, check_interval_s: float | None = None
    ) -> AsyncGenerator[RegistryChange, None]:
        """Changes of the live set, starting with a ``put`` for every live replica.

        Heartbeats that change nothing are filtered out; a replica whose heartbeat goes
        stale yields a ``delete`` with ``expired=True`` (checked every
        ``check_interval_s``, default TTL/3). Runs until the consumer stops iterating
        (``break`` or ``aclose()``), which stops the underlying NATS watcher.
        """
        interval = check_interval_s if check_interval_s is not None else self.ttl_s / 3
        kv = await self._bucket()
        watcher = await kv.watch(f"{_PREFIX}>")
        known: dict[str, agent_pb2.AgentDescriptor] = {}
        shapes: dict[str, bytes] = {}
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=interval)
                except nats.errors.TimeoutError:
                    entry = None
                now = time.time()
                if entry is not None:
                    change = self._apply(entry, known, shapes, now)
                    if change is not None:
                        yield change
                for key in [k for k, d in known.items() if not self._fresh(d, now)]:
                    gone = known.pop(key)
                    shapes.pop(key, None)
                    name, instance = _split_key(key)
                    yield RegistryChange("delete", key, name, instance, gone, expired=True)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(
        self,
        entry: KeyValue.Entry,
        known: dict[str, agent_pb2.AgentDescriptor],
        shapes: dict[str, bytes],
        now: float,
    ) -> RegistryChange | None:
        name, instance = _split_key(entry.key)
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            shapes.pop(entry.key, None)
            gone = known.pop(entry.key, None)
            if gone is None:
                return None
            return RegistryChange("delete", entry.key, name, instance, gone)
        descriptor = _decode(entry.key, entry.value)
        if descriptor is None or not self._fresh(descriptor, now):
            return None
        shape = _without_heartbeat(descriptor)
        known[entry.key] = descriptor
        if shapes.get(entry.key) == shape:
            return None
        shapes[entry.key] = shape
        return RegistryChange("put", entry.key, name, instance, descriptor)


def _decode(key: str, value: bytes) -> agent_pb2.AgentDescriptor | None:
    try:
        return agent_pb2.AgentDescriptor.FromString(value)
    except DecodeError:
        log.warning("registry_undecodable_entry", key=key)
        return None
