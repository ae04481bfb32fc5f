"""Frozen agents: the kill switch for one agent, in the frozen bucket of NATS KV.

The registry service is the only writer (``RegistryService.FreezeAgent``): one key per
frozen agent, its name, whose value is a serialized :class:`tessera.v1.registry_pb2.FrozenAgent`.
Readers keep the set current with :meth:`FrozenAgents.follow` (a KV watch, so a freeze
reaches every coordinator and tool proxy within a round trip) and ask
:meth:`FrozenAgents.is_frozen` on their hot paths, which costs no I/O.

Failing closed: until the first complete read of the bucket, :attr:`FrozenAgents.ready`
is false and readers refuse what a freeze would refuse (the tool proxy's calls).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import structlog
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from tessera.runtime.bus import Topology
from tessera.runtime.kv_follow import BucketFollower
from tessera.v1 import registry_pb2

__all__ = ["FrozenAgents", "frozen_key"]

log = structlog.get_logger(__name__)


def frozen_key(agent_name: str) -> str:
    """The KV key of one agent's freeze: its name (letters, digits, ``-``, ``_``)."""
    if not agent_name or not all(c.isalnum() or c in "-_" for c in agent_name):
        raise ValueError(f"agent name {agent_name!r}: use letters, digits, '-' and '_' only")
    return agent_name


class FrozenAgents:
    """The frozen bucket of ``topology``: writes (the registry service's) and the
    followed set (everyone else's). ``on_freeze`` runs for each agent frozen while
    following (the coordinator revokes its running attempts' tokens there)."""

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        on_freeze: Callable[[registry_pb2.FrozenAgent], Awaitable[None]] | None = None,
    ) -> None:
        self._js = js
        self._topology = topology
        self._kv: KeyValue | None = None
        self._frozen: dict[str, registry_pb2.FrozenAgent] = {}
        self._on_freeze = on_freeze
        self._ready = asyncio.Event()
        self._follower: BucketFollower | None = None
        self._incoming: dict[str, registry_pb2.FrozenAgent] | None = None
        """While a watch delivers the current values: what it delivered so far."""

    @property
    def ready(self) -> bool:
        """The whole bucket has been read at least once."""
        return self._ready.is_set()

    def is_frozen(self, agent_name: str) -> bool:
        return agent_name in self._frozen

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(self._topology.frozen_bucket)
        return self._kv

    # -- writes (the registry service) ----------------------------------------------------

    async def read(self, agent_name: str) -> registry_pb2.FrozenAgent | None:
        """The agent's freeze, read from the bucket now (None: not frozen)."""
        kv = await self._bucket()
        try:
            entry = await kv.get(frozen_key(agent_name))
        except KeyNotFoundError:  # also deleted / purged keys
            return None
        return _decode(entry.key, entry.value or b"")

    async def read_all(self) -> list[registry_pb2.FrozenAgent]:
        """Every freeze in force, read from the bucket now, by name."""
        kv = await self._bucket()
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        found = [await self.read(key) for key in sorted(keys)]
        return [record for record in found if record is not None]

    async def freeze(self, record: registry_pb2.FrozenAgent) -> registry_pb2.FrozenAgent:
        """Store ``record`` unless the agent is frozen already; the freeze in force."""
        kv = await self._bucket()
        key = frozen_key(record.name)
        try:
            await kv.create(key, record.SerializeToString())
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.read(record.name)
            if existing is not None:
                return existing
            # Deleted since (an unfreeze): a key with a delete marker takes a plain put.
            await kv.put(key, record.SerializeToString())
        return record

    async def unfreeze(self, agent_name: str) -> bool:
        """Lift the agent's freeze; whether there was one."""
        was = await self.read(agent_name) is not None
        if was:
            kv = await self._bucket()
            await kv.delete(frozen_key(agent_name))
        return was

    # -- following (coordinators, tool proxies) -------------------------------------------

    def start(self) -> None:
        """Follow the bucket in the background until :meth:`stop`."""
        if self._follower is None:
            self._follower = BucketFollower(
                self._js,
                self._topology.frozen_bucket,
                self._apply,
                restarted=self._rewatching,
                caught_up=self._caught_up,
            )
            self._follower.start()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the first complete read; whether it came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self.ready

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None

    def _rewatching(self) -> None:
        # The current values come again: gather them apart, so a freeze lifted while the
        # watch was down does not linger (the set in force serves meanwhile).
        self._incoming = {}

    def _caught_up(self) -> None:
        if self._incoming is not None:
            self._frozen, self._incoming = self._incoming, None
            self._ready.set()

    async def _apply(self, entry: KeyValue.Entry) -> None:
        catching_up = self._incoming is not None
        target = self._incoming if self._incoming is not None else self._frozen
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            if target.pop(entry.key, None) is not None and not catching_up:
                log.info("agent_unfrozen", agent=entry.key)
            return
        record = _decode(entry.key, entry.value)
        if record is None:
            return
        newly = record.name not in self._frozen
        target[record.name] = record
        if not catching_up and newly:
            log.info("agent_frozen", agent=record.name)
        if self._on_freeze is not None and (catching_up or newly):
            await self._on_freeze(record)


def _decode(key: str, value: bytes) -> registry_pb2.FrozenAgent | None:
    try:
        return registry_pb2.FrozenAgent.FromString(value)
    except DecodeError:
        log.warning("frozen_agents_undecodable_entry", key=key)
        return None
