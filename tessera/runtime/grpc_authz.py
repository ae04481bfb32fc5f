"""Every RPC authorized by the caller's verified workload identity.

:class:`CallerAuthorization` runs inside the error mapping of
:class:`~tessera.runtime.grpc_server.GrpcServer`: it reads the peer's SPIFFE ID from the TLS
auth context (the server already required a certificate from the mesh CA), checks it
against :data:`tessera.identity.callers.CALLERS` and answers PERMISSION_DENIED with
ErrorInfo (reason CALLER_NOT_ALLOWED) before any handler code runs. Handlers read the
verified caller with :func:`peer`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import structlog

from tessera.identity.callers import CALLERS, may_call
from tessera.identity.names import WorkloadName
from tessera.runtime.errors import PermissionDenied, Unauthenticated

__all__ = ["CallerAuthorization", "RefusedCall", "peer", "peer_of"]

log = structlog.get_logger(__name__)

_PEER: contextvars.ContextVar[WorkloadName | None] = contextvars.ContextVar(
    "tessera_peer", default=None
)
RefusedCall = Callable[[str, str, str], Awaitable[None] | None]
"""``(method, caller, reason)``, called for every refused call (e.g. to audit it)."""


def peer() -> WorkloadName | None:
    """The verified caller of the RPC being handled (None on a plaintext debug server)."""
    return _PEER.get()


def peer_of(context: grpc.aio.ServicerContext) -> WorkloadName | None:
    """The caller's identity from its verified certificate's SPIFFE ID, if it has one."""
    auth = context.auth_context() or {}
    ids = auth.get("peer_spiffe_id") or []
    if len(ids) != 1:
        return None
    raw = ids[0]
    return WorkloadName.from_spiffe_id(raw.decode() if isinstance(raw, bytes) else str(raw))


class CallerAuthorization:
    """Decides one call; used by GrpcServer's interceptor chain (see grpc_server)."""

    def __init__(
        self,
        *,
        trust_domain: str,
        table: Mapping[str, frozenset[str]] = CALLERS,
        on_refused: RefusedCall | None = None,
    ) -> None:
        self._trust_domain = trust_domain
        self._table = table
        self._on_refused = on_refused

    async def check(self, method: str, context: grpc.aio.ServicerContext) -> WorkloadName:
        caller = peer_of(context)
        if caller is None or caller.trust_domain != self._trust_domain:
            await self._refused(method, "", "UNAUTHENTICATED")
            raise Unauthenticated(
                "the caller presented no workload identity of this mesh",
                reason="NO_WORKLOAD_IDENTITY",
                metadata={"method": method},
            )
        if not may_call(caller, method, self._table):
            await self._refused(method, caller.spiffe_id, "CALLER_NOT_ALLOWED")
            raise PermissionDenied(
                f"{caller} may not call {method}",
                reason="CALLER_NOT_ALLOWED",
                metadata={"method": method, "caller": caller.spiffe_id},
            )
        return caller

    async def _refused(self, method: str, caller: str, reason: str) -> None:
        log.warning("rpc_caller_refused", method=method, caller=caller or None, reason=reason)
        if self._on_refused is not None:
            result = self._on_refused(method, caller, reason)
            if result is not None:
                await result

    def bind(self, caller: WorkloadName) -> contextvars.Token[WorkloadName | None]:
        return _PEER.set(caller)

    @staticmethod
    def unbind(token: contextvars.Token[WorkloadName | None]) -> None:
        # A stream its client abandoned may be finalized by the event loop in another
        # context than the one it bound the caller in; that context is gone, so there is
        # nothing left to restore (raising here only logs "Task exception was never
        # retrieved").
        with contextlib.suppress(ValueError):
            _PEER.reset(token)


@contextlib.asynccontextmanager
async def _authorized(
    authorization: CallerAuthorization, method: str, context: grpc.aio.ServicerContext
) -> AsyncIterator[None]:
    """Checks the caller, then exposes it to the handler through :func:`peer`."""
    caller = await authorization.check(method, context)
    token = authorization.bind(caller)
    try:
        yield
    finally:
        authorization.unbind(token)


def authorizing(
    authorization: CallerAuthorization, method: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a unary handler behaviour so it runs only for an allowed caller."""

    def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _authorized(authorization, method, context):
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

        return wrapper

    return wrap


def authorizing_stream(
    authorization: CallerAuthorization, method: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Same for handlers that stream their response."""

    def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _authorized(authorization, method, context):
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    # Closed here, in this context, when the call ends or is cancelled:
                    # left to the garbage collector, its finally blocks would run later
                    # in another task's context.
                    async with contextlib.aclosing(result):
                        async for item in result:
                            yield item
                elif inspect.isawaitable(result):
                    await result
                elif result is not None:
                    for item in result:
                        yield item

        return wrapper

    return wrap
