"""A grpc.aio server with everything a Tessera service needs, and a runner for it.

:class:`GrpcServer` adds, around the servicers a service registers: standard health
checking, server reflection, OpenTelemetry, the domain-error mapping of
:mod:`tessera.runtime.errors`, a deadline guard, message size limits and keepalive
enforcement. :func:`serve` runs one until SIGTERM/SIGINT; :func:`run` runs ``main`` on uvloop.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import nats.errors
import structlog
import uvloop
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tessera.identity.credentials import server_credentials
from tessera.identity.source import CertificateSource
from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    TesseraError,
    Unavailable,
    to_grpc_status,
)
from tessera.runtime.grpc_authz import (
    CallerAuthorization,
    RefusedCall,
    authorizing,
    authorizing_stream,
)
from tessera.runtime.telemetry import server_interceptors

__all__ = [
    "CallerAuthorizationInterceptor",
    "DeadlineGuardInterceptor",
    "ErrorMappingInterceptor",
    "GrpcServer",
    "run",
    "serve",
]

log = structlog.get_logger(__name__)

Behavior = Callable[..., Any]
HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _strict_decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[Any], Any]:
    """Decode a request ourselves: grpcio answers INTERNAL to undecodable bytes and keeps
    unknown fields silently; callers deserve INVALID_ARGUMENT saying what is wrong."""

    def decode(raw: Any) -> Any:
        if deserializer is None or not isinstance(raw, bytes):
            return raw
        try:
            message = deserializer(raw)
        except Exception as exc:  # DecodeError, bad UTF-8, wrong wire types
            raise InvalidArgument(
                "the request is not a valid message of this method's type",
                reason="MALFORMED_REQUEST",
                field_violations=[("request", str(exc)[:200])],
            ) from None
        if isinstance(message, Message):
            unknown = sorted({f.field_number for f in UnknownFieldSet(message)})  # type: ignore[attr-defined]
            if unknown:
                raise InvalidArgument(
                    "the request has fields this service does not know",
                    reason="UNKNOWN_FIELDS",
                    field_violations=[(f"#{n}", "unknown field number") for n in unknown],
                )
        return message

    return decode


def _wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap_unary: Callable[[Behavior], Behavior],
    wrap_stream: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler | None:
    """Rebuild ``handler`` with its behaviour wrapped (unary or streaming response).
    Unary requests arrive as bytes and are decoded by the wrapper (see _strict_decoder)."""
    if handler is None:
        return None
    decode = _strict_decoder(handler.request_deserializer)
    kwargs = {
        "request_deserializer": None,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming:
        kwargs["request_deserializer"] = handler.request_deserializer
    else:
        wrap_unary = _decoding(wrap_unary, decode)
        wrap_stream = _decoding(wrap_stream, decode)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kwargs)
    return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kwargs)


def _decoding(
    wrap: Callable[[Behavior], Behavior], decode: Callable[[Any], Any]
) -> Callable[[Behavior], Behavior]:
    """`wrap`, with the request decoded first (inside the error mapping)."""

    def wrap_decoded(behavior: Behavior) -> Behavior:
        def decoded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return behavior(decode(request), context)

        return wrap(decoded)

    return wrap_decoded


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def _abort_unexpected(
    context: grpc.aio.ServicerContext, method: str, exc: BaseException
) -> None:
    ref = str(uuid.uuid4())
    if isinstance(exc, nats.errors.Error):
        # NATS failing over or unreachable: the caller should retry, not report a bug.
        log.warning("rpc_dependency_unavailable", method=method, ref=ref, error=repr(exc))
        await context.abort_with_status(
            to_grpc_status(
                Unavailable(
                    f"the event store is temporarily unavailable (ref {ref}); retry",
                    reason="NATS_UNAVAILABLE",
                    retry_after_s=1.0,
                    metadata={"ref": ref},
                )
            )
        )
    log.error("rpc_unexpected_error", method=method, ref=ref, exc_info=exc)
    await context.abort_with_status(
        to_grpc_status(Internal(f"internal error (ref {ref})", metadata={"ref": ref}))
    )


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions into statuses a client can act on.

    * :class:`TesseraError` → its code with ErrorInfo and details (AIP-193);
    * any other exception → INTERNAL "internal error (ref <uuid>)", reason INTERNAL; the
      exception is logged with the same ref and its text never reaches the client;
    * ``grpc.aio.AbortError`` (``context.abort``) and cancellation pass through.

    A TesseraError raised by an inner interceptor's ``intercept_service`` is mapped too.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        try:
            handler = await continuation(handler_call_details)
        except TesseraError as exc:
            return _failing_handler(exc)

        def wrap_unary(behavior: Behavior) -> Behavior:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await _maybe_await(behavior(request, context))
                except grpc.aio.AbortError:
                    raise
                except TesseraError as exc:
                    await context.abort_with_status(to_grpc_status(exc))
                except Exception as exc:
                    await _abort_unexpected(context, method, exc)

            return wrapper

        def wrap_stream(behavior: Behavior) -> Behavior:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    result = behavior(request, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):
                        await result
                    elif result is not None:
                        for item in result:
                            yield item
                except grpc.aio.AbortError:
                    raise
                except TesseraError as exc:
                    await context.abort_with_status(to_grpc_status(exc))
                except Exception as exc:
                    await _abort_unexpected(context, method, exc)

            return wrapper

        return _wrap_handler(handler, wrap_unary, wrap_stream)


class CallerAuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call before its handler runs unless the table allows the verified caller
    (see :mod:`tessera.runtime.grpc_authz`); sits inside the error mapping."""

    def __init__(self, authorization: CallerAuthorization) -> None:
        self._authorization = authorization

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        return _wrap_handler(
            handler,
            authorizing(self._authorization, method),
            authorizing_stream(self._authorization, method),
        )


def _failing_handler(exc: TesseraError) -> grpc.RpcMethodHandler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(to_grpc_status(exc))

    return grpc.unary_unary_rpc_method_handler(abort)


class DeadlineGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bounds every handler's run time.

    A call without a deadline runs under ``default_s``; one whose deadline is further away
    than ``max_s`` runs under ``max_s``; on expiry the handler is cancelled and the caller
    gets DEADLINE_EXCEEDED (reason DEADLINE_EXCEEDED). Calls with a shorter deadline are
    left to gRPC's own deadline handling. For streaming responses the bound covers the
    whole stream.
    """

    def __init__(self, *, default_s: float, max_s: float) -> None:
        self._default_s = default_s
        self._max_s = max_s

    def _limit(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        if remaining is None:
            return self._default_s
        if remaining > self._max_s:
            return self._max_s
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method

        def expired(limit: float) -> DeadlineExceeded:
            log.warning("rpc_deadline_guard_expired", method=method, limit_s=limit)
            return DeadlineExceeded(
                f"server deadline of {limit:g}s exceeded",
                metadata={"limit_s": f"{limit:g}"},
            )

        def wrap_unary(behavior: Behavior) -> Behavior:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                limit = self._limit(context)
                if limit is None:
                    return await _maybe_await(behavior(request, context))
                try:
                    async with asyncio.timeout(limit) as scope:
                        return await _maybe_await(behavior(request, context))
                except TimeoutError:
                    if scope.expired():
                        raise expired(limit) from None
                    raise

            return wrapper

        def wrap_stream(behavior: Behavior) -> Behavior:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                limit = self._limit(context)
                result = behavior(request, context)
                if limit is None:
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:
                        await _maybe_await(result)
                    return
                when = asyncio.get_running_loop().time() + limit
                # The timeout only ever wraps our own awaits, never grpc's write between
                # two yields, so expiry cancels the handler and nothing else.
                if hasattr(result, "__aiter__"):
                    iterator: AsyncIterator[Any] = aiter(result)
                    while True:
                        try:
                            async with asyncio.timeout_at(when) as scope:
                                item = await anext(iterator)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            if scope.expired():
                                raise expired(limit) from None
                            raise
                        yield item
                else:
                    try:
                        async with asyncio.timeout_at(when) as scope:
                            await _maybe_await(result)
                    except TimeoutError:
                        if scope.expired():
                            raise expired(limit) from None
                        raise

            return wrapper

        return _wrap_handler(handler, wrap_unary, wrap_stream)


def _server_options(settings: ServiceSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Ping idle clients every 30 s, drop them if no ack in 10 s.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Tolerate client pings down to every 10 s (ours ping every 30 s), GOAWAY abusers.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", 5 * 60_000),
        # Never share a port with a stale process: binding a taken port must fail.
        ("grpc.so_reuseport", 0),
    ]


def _split_listen(listen: str) -> tuple[str, str]:
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise ValueError(f"listen must be host:port, got {listen!r}")
    return host, port


class GrpcServer:
    """One grpc.aio server; ``start()``/``stop()``, nothing runs before ``start()``.

    ``register`` callables add servicers (``add_FooServiceServicer_to_server``);
    ``service_names`` are their full names (``tessera.v1.PlannerService``) for health and
    reflection. Interceptors, outermost first: OpenTelemetry, error mapping, caller
    authorization, deadline guard, then ``extra_interceptors`` (whose TesseraErrors are
    mapped as well).

    ``identity``: this workload's certificate. The server then listens with mTLS only
    (client certificates from the mesh CA required, renewals picked up at the next
    handshake) and authorizes every call by the caller's identity. Without one it refuses
    to start unless ``settings.insecure_plaintext`` (a loud local-debugging opt-in).
    """

    def __init__(
        self,
        *,
        name: str,
        settings: ServiceSettings,
        register: Sequence[Callable[[grpc.aio.Server], None]],
        service_names: Sequence[str],
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        identity: CertificateSource | None = None,
        on_refused: RefusedCall | None = None,
    ) -> None:
        self.name = name
        self.identity = identity
        self._on_refused = on_refused
        self.settings = settings
        self._register = list(register)
        self.service_names: tuple[str, ...] = tuple(service_names)
        self._extra = list(extra_interceptors)
        self.health = HealthServicer()
        """Health servicer; a service may flip its own names to NOT_SERVING and back."""
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name}: server not started")
        return self._port

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> str:
        """``host:port`` a local client can dial (wildcard hosts become 127.0.0.1)."""
        host, _ = _split_listen(self.settings.listen)
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self, *, serving: bool = True) -> int:
        """Bind ``settings.listen``, start serving, mark every name SERVING (with
        ``serving=False``, NOT_SERVING until :meth:`mark_serving`); the port."""
        if self._server is not None:
            raise RuntimeError(f"{self.name}: server already started")
        if self.identity is None and not self.settings.insecure_plaintext:
            raise RuntimeError(
                f"{self.name}: no workload identity (set TESSERA_VAULT_APPROLE_FILE so the "
                "service can obtain its certificate); plaintext gRPC is only for local "
                "debugging, with TESSERA_INSECURE_PLAINTEXT=1"
            )
        authorization: list[grpc.aio.ServerInterceptor] = []
        if self.identity is not None:
            authorization.append(
                CallerAuthorizationInterceptor(
                    CallerAuthorization(
                        trust_domain=self.identity.name.trust_domain, on_refused=self._on_refused
                    )
                )
            )
        else:
            log.warning("grpc_server_plaintext", server=self.name, insecure_plaintext=True)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            *server_interceptors(),
            ErrorMappingInterceptor(),
            *authorization,
            DeadlineGuardInterceptor(
                default_s=self.settings.default_deadline_s, max_s=self.settings.max_deadline_s
            ),
            *self._extra,
        ]
        server = grpc.aio.server(interceptors=interceptors, options=_server_options(self.settings))
        for register in self._register:
            register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self.service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        try:
            if self.identity is not None:
                port = server.add_secure_port(
                    self.settings.listen, server_credentials(self.identity)
                )
            else:
                port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as exc:
            raise OSError(f"{self.name}: cannot bind {self.settings.listen}") from exc
        if port == 0:
            raise OSError(f"{self.name}: cannot bind {self.settings.listen}")
        await server.start()
        self._server, self._port = server, port
        await self._report(
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        log.info("grpc_server_started", server=self.name, address=self.address)
        return port

    async def mark_serving(self) -> None:
        """Report SERVING for every name: the service is ready for the work it exists for."""
        await self._report(health_pb2.HealthCheckResponse.SERVING)

    async def _report(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", *self.service_names):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING for every name, then stop, letting calls finish for ``grace``
        seconds (default ``settings.shutdown_grace_s``). Idempotent."""
        server = self._server
        if server is None or self._stopped.is_set():
            return
        await self.health.enter_graceful_shutdown()
        grace_s = self.settings.shutdown_grace_s if grace is None else grace
        log.info("grpc_server_stopping", server=self.name, grace_s=grace_s)
        await server.stop(grace_s)
        self._stopped.set()
        log.info("grpc_server_stopped", server=self.name)

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped (immediately if it never started)."""
        if self._server is None:
            return
        await self._stopped.wait()


async def serve(
    server: GrpcServer, *, on_stop: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Start ``server`` (unless already started), stop it gracefully on SIGTERM/SIGINT or
    when something else stops it, then run ``on_stop``."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        if not server.started:
            await server.start()
        stop_wait = asyncio.create_task(stop_requested.wait())
        done_wait = asyncio.create_task(server.wait_for_termination())
        try:
            await asyncio.wait({stop_wait, done_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            done_wait.cancel()
        await server.stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if on_stop is not None:
            await on_stop()


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main()`` to completion on a uvloop event loop (the entry point of a service)."""

    async def _main() -> None:
        await main()

    uvloop.run(_main())
