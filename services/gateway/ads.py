"""Aggregated discovery (ADS), state of the world, for any number of Envoys.

One :class:`SnapshotCache` holds the current resources of every type; each Envoy keeps one
``StreamAggregatedResources`` stream and, per resource type, this protocol state:

* a response carries ``version_info`` (a hash of exactly the resources it contains, so an
  unchanged set is never re-sent) and a fresh ``nonce``;
* a request whose ``response_nonce`` is not the last nonce sent for its type is stale
  and ignored (the answer to the newer response is on its way);
* a request with the last nonce and no ``error_detail`` is an ACK: that version is live;
* one with ``error_detail`` is a NACK: Envoy keeps its last good version, the rejection is
  logged, and the same content is not sent again (the next change is);
* a request without a nonce (a new stream, a new type) or with different resource names
  is answered at once.

Listeners and clusters are wildcard subscriptions (the whole set); routes and endpoints
are answered for the names Envoy asks for. On a snapshot change every subscribed type is
re-evaluated in make-before-break order: clusters, endpoints, listeners, routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

__all__ = [
    "ADS_SERVICE_NAME",
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "SECRET",
    "AggregatedDiscoveryServer",
    "Snapshot",
    "SnapshotCache",
]

log = structlog.get_logger(__name__)

ADS_SERVICE_NAME: Final[str] = ads_pb2.DESCRIPTOR.services_by_name[
    "AggregatedDiscoveryService"
].full_name
_PREFIX = "type.googleapis.com/"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET: Final = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
# Secrets first: a cluster whose certificate has not arrived cannot connect.
ORDER: Final = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)
_WILDCARD_TYPES: Final = frozenset({LISTENER, CLUSTER})


@dataclass(frozen=True)
class Snapshot:
    """Resources by type URL, then by name, packed as ``Any``."""

    resources: Mapping[str, Mapping[str, any_pb2.Any]] = field(default_factory=dict)

    def select(self, type_url: str, names: frozenset[str] | None) -> list[any_pb2.Any]:
        """The resources of ``type_url`` named in ``names`` (``None``: all), by name."""
        by_name = self.resources.get(type_url, {})
        wanted = sorted(by_name) if names is None else sorted(n for n in names if n in by_name)
        return [by_name[n] for n in wanted]


def version_of(resources: Iterable[any_pb2.Any]) -> str:
    """A version that changes exactly when the content does."""
    digest = hashlib.sha256()
    for resource in resources:
        digest.update(resource.type_url.encode())
        digest.update(len(resource.value).to_bytes(8, "big"))
        digest.update(resource.value)
    return digest.hexdigest()[:16]


class SnapshotCache:
    """The current snapshot; streams subscribe to hear when it changes."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._subscribers: set[asyncio.Queue[object]] = set()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def set(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        for queue in self._subscribers:
            queue.put_nowait(_CHANGED)

    def subscribe(self) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[object]) -> None:
        self._subscribers.discard(queue)


_CHANGED: Final = object()
_EOF: Final = object()


@dataclass
class _TypeState:
    """What one stream has asked for and been sent, for one resource type."""

    names: frozenset[str] | None = frozenset()
    nonce: str = ""
    sent_version: str = ""
    acked_version: str = ""
    rejected_version: str = ""


class AggregatedDiscoveryServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW ADS over ``cache``; the incremental (delta) variant is not offered."""

    def __init__(self, cache: SnapshotCache, *, identifier: str) -> None:
        self._cache = cache
        self._identifier = identifier
        self._streams = itertools.count(1)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream_id = next(self._streams)
        queue = self._cache.subscribe()
        reader = asyncio.create_task(_pump(request_iterator, queue))
        states: dict[str, _TypeState] = {}
        nonces = itertools.count(1)
        node = ""
        log.info("xds_stream_opened", stream=stream_id, peer=context.peer())
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    return
                if item is _CHANGED:
                    snapshot = self._cache.snapshot
                    for type_url in sorted(states, key=_order):
                        response = self._respond(
                            states[type_url], type_url, snapshot, nonces, force=False
                        )
                        if response is not None:
                            log.info(
                                "xds_push",
                                stream=stream_id,
                                node=node,
                                type=_short(type_url),
                                version=response.version_info,
                                resources=len(response.resources),
                            )
                            yield response
                    continue
                assert isinstance(item, discovery_pb2.DiscoveryRequest)
                request = item
                if request.node.id:
                    node = request.node.id
                response = self._on_request(stream_id, node, request, states, nonces)
                if response is not None:
                    yield response
        finally:
            reader.cancel()
            self._cache.unsubscribe(queue)
            log.info("xds_stream_closed", stream=stream_id, node=node)

    def _on_request(
        self,
        stream_id: int,
        node: str,
        request: discovery_pb2.DiscoveryRequest,
        states: dict[str, _TypeState],
        nonces: Iterator[int],
    ) -> discovery_pb2.DiscoveryResponse | None:
        type_url = request.type_url
        state = states.setdefault(type_url, _TypeState())
        names = _subscription(type_url, request.resource_names)
        if request.response_nonce:
            if request.response_nonce != state.nonce:
                log.debug("xds_stale_request", stream=stream_id, type=_short(type_url))
                return None
            if request.HasField("error_detail"):
                state.rejected_version = state.sent_version
                log.warning(
                    "xds_nack",
                    stream=stream_id,
                    node=node,
                    type=_short(type_url),
                    rejected_version=state.sent_version,
                    live_version=request.version_info,
                    error=request.error_detail.message,
                )
                state.names = names
                return None
            state.acked_version = request.version_info
            log.debug(
                "xds_ack", stream=stream_id, type=_short(type_url), version=request.version_info
            )
        changed_names = names != state.names
        state.names = names
        response = self._respond(
            state,
            type_url,
            self._cache.snapshot,
            nonces,
            force=not request.response_nonce or changed_names,
        )
        if response is not None:
            log.info(
                "xds_sent",
                stream=stream_id,
                node=node,
                type=_short(type_url),
                version=response.version_info,
                resources=len(response.resources),
            )
        return response

    def _respond(
        self,
        state: _TypeState,
        type_url: str,
        snapshot: Snapshot,
        nonces: Iterator[int],
        *,
        force: bool,
    ) -> discovery_pb2.DiscoveryResponse | None:
        if type_url not in ORDER:
            # An unknown type: answer once, empty, so Envoy does not wait for it.
            if not force:
                return None
            resources: list[any_pb2.Any] = []
        else:
            resources = snapshot.select(type_url, state.names)
        version = version_of(resources)
        if not force and version in (state.sent_version, state.rejected_version):
            return None
        state.nonce = str(next(nonces))
        state.sent_version = version
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=resources,
            type_url=type_url,
            nonce=state.nonce,
            control_plane=base_pb2.ControlPlane(identifier=self._identifier),
        )


def _subscription(type_url: str, names: Iterable[str]) -> frozenset[str] | None:
    wanted = frozenset(names)
    if type_url in _WILDCARD_TYPES and (not wanted or "*" in wanted):
        return None
    return wanted


def _order(type_url: str) -> int:
    return ORDER.index(type_url) if type_url in ORDER else len(ORDER)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


async def _pump(
    requests: AsyncIterator[discovery_pb2.DiscoveryRequest], queue: asyncio.Queue[object]
) -> None:
    """Feed a stream's requests into its queue, then ``_EOF`` however the stream ends."""
    try:
        async for request in requests:
            queue.put_nowait(request)
    except grpc.aio.AioRpcError as exc:
        log.debug("xds_stream_read_ended", code=str(exc.code()))
    except Exception as exc:
        log.warning("xds_stream_read_failed", error=repr(exc))
    finally:
        queue.put_nowait(_EOF)
