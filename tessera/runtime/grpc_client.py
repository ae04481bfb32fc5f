"""grpc.aio channels configured the Tessera way, and a readiness probe.

Channels are long-lived: create one per peer at start-up and reuse it (a channel
multiplexes every call over one HTTP/2 connection and reconnects by itself).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.identity.channel import RotatingChannel
from tessera.identity.names import WorkloadName
from tessera.identity.source import CertificateSource
from tessera.runtime.config import MIB
from tessera.runtime.telemetry import client_interceptors

__all__ = [
    "RECONNECT_BACKOFF_INITIAL_MS",
    "RECONNECT_BACKOFF_MAX_MS",
    "DefaultDeadlineInterceptor",
    "channel",
    "reconnect_options",
    "service_config",
    "wait_for_serving",
]

RECONNECT_BACKOFF_INITIAL_MS = 100
RECONNECT_BACKOFF_MAX_MS = 250
"""After losing its peer, a channel tries to reconnect after 0.1 s, backing off (x1.6, with
jitter) to at most 0.25 s between attempts: a restarted peer is reached at most ~0.25 s
after it serves again. With gRPC's defaults (1 s, growing to 120 s) a caller that kept
calling while the peer was down reached it 1-2 s after it was SERVING again."""


def reconnect_options() -> list[tuple[str, Any]]:
    """Channel options for the reconnect backoff above (also for short-lived probes)."""
    return [
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


class DefaultDeadlineInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    """Gives unary-unary and unary-stream calls a timeout when the caller set none."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds

    def _with_timeout(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if details.timeout is not None:
            return details
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=self.seconds,
            metadata=details.metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._with_timeout(client_call_details), request)

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._with_timeout(client_call_details), request)


def _with_metadata(
    details: grpc.aio.ClientCallDetails, metadata: Sequence[tuple[str, str]]
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*(details.metadata or ()), *metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _UnaryMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_metadata(client_call_details, self.metadata), request)


class _StreamMetadata(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_metadata(client_call_details, self.metadata), request)


def metadata_interceptors(metadata: Sequence[tuple[str, str]]) -> list[Any]:
    """Interceptors that add fixed ``metadata`` (a person's ``authorization: Bearer``) to
    every unary and server-streaming call. Two objects, not one class of both kinds:
    grpc.aio files an interceptor under the first kind it matches only."""
    return [_UnaryMetadata(metadata), _StreamMetadata(metadata)]


def service_config(max_attempts: int) -> str:
    """gRPC service config: bounded retries of UNAVAILABLE for every method."""
    method_config: dict[str, Any] = {"name": [{}], "waitForReady": False}
    if max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method_config]})


def channel(
    target: str,
    *,
    service: str | None = None,
    max_attempts: int = 3,
    max_message_bytes: int = 4 * MIB,
    default_timeout_s: float = 10.0,
    identity: CertificateSource | None = None,
    peer: WorkloadName | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> grpc.aio.Channel:
    """An aio channel to ``target`` with keepalive, tracing, a default deadline, transparent
    retries (``max_attempts`` in total, UNAVAILABLE only; gRPC caps it at 5) and a short
    reconnect backoff (see ``RECONNECT_BACKOFF_MAX_MS``).

    With ``identity`` the channel is mTLS: it presents this workload's certificate, trusts
    only the mesh CA, accepts only a server whose certificate names ``peer`` (required)
    and follows certificate renewals (:class:`~tessera.identity.channel.RotatingChannel`).
    Without it the channel is plaintext, for servers in local-debugging mode only.

    ``service`` only labels the channel (``grpc.primary_user_agent``) for the peer's logs.
    ``metadata`` goes with every call (:func:`metadata_interceptors`).
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.service_config", service_config(max_attempts)),
        *reconnect_options(),
    ]
    if service:
        options.append(("grpc.primary_user_agent", f"tessera-{service}"))
    interceptors: list[Any] = [
        *client_interceptors(),
        DefaultDeadlineInterceptor(default_timeout_s),
    ]
    if metadata:
        interceptors += metadata_interceptors(metadata)
    if identity is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if peer is None:
        raise ValueError("an mTLS channel needs the peer identity it expects")
    secure_options = [*options, ("grpc.ssl_target_name_override", peer.dns_name)]

    def secure(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            target, credentials, options=secure_options, interceptors=interceptors
        )

    return RotatingChannel(identity, secure)


async def wait_for_serving(
    target: str,
    service: str = "",
    *,
    timeout: float,  # noqa: ASYNC109 (a readiness budget, not one call's timeout)
    identity: CertificateSource | None = None,
    peer: WorkloadName | None = None,
) -> None:
    """Poll grpc.health.v1 ``Check`` on ``target`` until ``service`` is SERVING.

    Raises ``TimeoutError`` naming the target, service and last answer after ``timeout``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.02
    last = "no answer"
    if identity is None:
        probe = grpc.aio.insecure_channel(target, options=reconnect_options())
    else:
        probe = channel(target, identity=identity, peer=peer, max_attempts=1)
    async with probe as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{target} service {service!r} not SERVING after {timeout:g}s (last: {last})"
                )
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=min(max(remaining, 0.01), 1.0),
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as err:
                last = f"{err.code().name}: {err.details()}"
            await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
            delay = min(delay * 2, 0.5)
