"""A client channel that follows its workload certificate's renewals.

A TLS connection keeps the certificate it was opened with; once that certificate expires,
the next reconnect would fail. :class:`RotatingChannel` builds a fresh secure channel on
every renewal and sends new calls over it; calls already in flight finish on the old one,
which is closed after ``drain_s``. Stubs made from it never need rebuilding: each
multicallable looks the current channel up per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc

from tessera.identity.credentials import channel_credentials
from tessera.identity.source import CertificateSource

__all__ = ["RotatingChannel"]

ChannelFactory = Callable[[grpc.ChannelCredentials], grpc.aio.Channel]


class _Current:
    """One multicallable (kind, method, serializers), bound to whichever channel is
    current: rebuilt on the first call after a renewal."""

    def __init__(self, owner: RotatingChannel, kind: str, method: str, kwargs: dict[str, Any]):
        self._owner = owner
        self._kind = kind
        self._method = method
        self._kwargs = kwargs
        self._bound: tuple[int, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation, current = self._owner._current()
        if self._bound is None or self._bound[0] != generation:
            self._bound = (generation, getattr(current, self._kind)(self._method, **self._kwargs))
        return self._bound[1](*args, **kwargs)


class RotatingChannel(grpc.aio.Channel):
    def __init__(
        self, source: CertificateSource, factory: ChannelFactory, *, drain_s: float = 300.0
    ) -> None:
        self._source = source
        self._factory = factory
        self._drain_s = drain_s
        self._channel = factory(channel_credentials(source))
        self._generation = source.generation
        self._draining: set[asyncio.Task[None]] = set()
        self._closed = False
        self._unsubscribe = source.subscribe(self._rebuild)

    def _rebuild(self) -> None:
        if self._closed or self._source.generation == self._generation:
            return
        old = self._channel
        self._channel = self._factory(channel_credentials(self._source))
        self._generation = self._source.generation
        task = asyncio.get_running_loop().create_task(self._drain(old))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, old: grpc.aio.Channel) -> None:
        await old.close(grace=self._drain_s)

    def _current(self) -> tuple[int, grpc.aio.Channel]:
        return self._generation, self._channel

    # grpc.aio.Channel ------------------------------------------------------------------

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _Current(self, "unary_unary", method, _named(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _Current(self, "unary_stream", method, _named(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _Current(self, "stream_unary", method, _named(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _Current(self, "stream_stream", method, _named(args, kwargs))

    async def close(self, grace: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        for task in list(self._draining):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def __aenter__(self) -> RotatingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


def _named(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("request_serializer", "response_deserializer", "_registered_method")
    return {**dict(zip(names, args, strict=False)), **kwargs}
