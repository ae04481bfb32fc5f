"""Domain exceptions and their mapping to ``google.rpc.Status`` with details (AIP-193).

Server side: raise a :class:`TesseraError` subclass anywhere in a handler; the
``ErrorMappingInterceptor`` of :mod:`tessera.runtime.grpc_server` turns it into a status
with an ``ErrorInfo`` (reason, domain ``tessera``, metadata) plus the detail matching the
class (``BadRequest``, ``PreconditionFailure``, ``RetryInfo``).

Typed details of our own contracts (e.g. ``tessera.v1.ApprovalRequired``) ride along:
give them as ``extra_details`` to any :class:`TesseraError`; they are packed as ``Any``
after the standard details.

Client side: :func:`error_details` parses any failed call back into :class:`ErrorDetails`, so
callers branch on ``reason`` rather than on message strings, and unpack a typed detail
with :meth:`ErrorDetails.detail`. :func:`from_rpc_error` keeps every detail, so a service
passes a peer's failure on to its own caller unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DOMAIN",
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "ErrorDetails",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TesseraError",
    "Unauthenticated",
    "Unavailable",
    "error_details",
    "from_rpc_error",
    "to_grpc_status",
    "to_status",
    "unpack_detail",
]

DOMAIN = "tessera"
_DETAILS_KEY = "grpc-status-details-bin"
_CODES_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

M = TypeVar("M", bound=Message)


def _packed(detail: Message) -> any_pb2.Any:
    if isinstance(detail, any_pb2.Any):
        return detail
    item = any_pb2.Any()
    item.Pack(detail)
    return item


def unpack_detail(details: Iterable[any_pb2.Any], message_type: type[M]) -> M | None:
    """The first detail of type ``message_type`` among ``details``, unpacked; None if
    there is none."""
    for item in details:
        out = message_type()
        if item.Unpack(out):  # False (and ``out`` untouched) for another type
            return out
    return None


class TesseraError(Exception):
    """Base of every domain error that crosses a gRPC boundary.

    ``reason`` is a stable UPPER_SNAKE identifier clients may branch on; ``message`` is
    for humans and is sent to the caller, so it must never hold secrets.
    ``extra_details``: typed detail messages sent after the standard ones (packed as
    ``Any``; an ``Any`` received from a peer is sent on unchanged).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"
    domain: ClassVar[str] = DOMAIN
    """ErrorInfo's domain: ours, or the contract's whose reasons an error uses (A2A's)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        extra_details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.extra_details: tuple[any_pb2.Any, ...] = tuple(_packed(d) for d in extra_details)
        """Typed details beyond the standard ones, packed."""

    def details(self) -> list[Any]:
        """Standard detail messages beyond ErrorInfo; subclasses extend."""
        return []

    def detail(self, message_type: type[M]) -> M | None:
        """The extra detail of type ``message_type``, unpacked (None if absent)."""
        return unpack_detail(self.extra_details, message_type)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgument(TesseraError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "INVALID_ARGUMENT",
        field_violations: Sequence[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
        extra_details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, extra_details=extra_details)
        self.field_violations: tuple[tuple[str, str], ...] = tuple(field_violations)
        """(field path, description) pairs."""

    def details(self) -> list[Any]:
        if not self.field_violations:
            return []
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
        ]


class NotFound(TesseraError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TesseraError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(TesseraError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Sequence[tuple[str, str, str]] = (),
        metadata: Mapping[str, str] | None = None,
        extra_details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, extra_details=extra_details)
        self.violations: tuple[tuple[str, str, str], ...] = tuple(violations)
        """(type, subject, description) triples."""

    def details(self) -> list[Any]:
        if not self.violations:
            return []
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=t, subject=s, description=d
                    )
                    for t, s, d in self.violations
                ]
            )
        ]


class PermissionDenied(TesseraError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(TesseraError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class _Retryable(TesseraError):
    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
        extra_details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, extra_details=extra_details)
        self.retry_after_s = retry_after_s

    def details(self) -> list[Any]:
        if self.retry_after_s is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(max(self.retry_after_s, 0.0) * 1e9))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class ResourceExhausted(_Retryable):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(_Retryable):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(TesseraError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Aborted(_Retryable):
    """A concurrency conflict: retry, after ``retry_after_s`` when given."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Internal(TesseraError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def to_status(exc: TesseraError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for ``exc``: ErrorInfo first, then class-specific details,
    then the extra typed details."""
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=exc.domain, metadata=exc.metadata)
    packed = [_packed(detail) for detail in [info, *exc.details()]]
    packed.extend(exc.extra_details)
    return status_pb2.Status(code=exc.code.value[0], message=exc.message, details=packed)


def to_grpc_status(exc: TesseraError) -> grpc.Status:
    """A ``grpc.Status`` for ``context.abort_with_status`` (details in trailing metadata)."""
    status: grpc.Status = rpc_status.to_status(to_status(exc))
    return status


@dataclass(frozen=True)
class ErrorDetails:
    """What a client can rely on about a failed call, parsed from its rich status."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: tuple[tuple[str, str], ...] = ()
    precondition_violations: tuple[tuple[str, str, str], ...] = ()
    retry_after_s: float | None = None
    extra: tuple[any_pb2.Any, ...] = ()
    """Every other detail (our typed ones, e.g. ``ApprovalRequired``), packed as it came."""

    def detail(self, message_type: type[M]) -> M | None:
        """The detail of type ``message_type``, unpacked (None if the status has none)."""
        return unpack_detail(self.extra, message_type)


def _trailing(err: grpc.RpcError) -> Iterable[tuple[str, str | bytes]]:
    getter = getattr(err, "trailing_metadata", None)
    if getter is None:
        return ()
    md = getter()
    return md if md is not None else ()


def error_details(err: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Parse a failed call (sync or aio) into :class:`ErrorDetails`.

    Works for any server: a status without ``grpc-status-details-bin`` yields only code and
    message; detail types it does not parse itself are kept, packed, in ``extra``.
    """
    code_fn = getattr(err, "code", None)
    code = code_fn() if code_fn is not None else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    message = (details_fn() if details_fn is not None else None) or ""

    raw: bytes | None = None
    for key, value in _trailing(err):
        if key == _DETAILS_KEY and isinstance(value, bytes):
            raw = value
            break
    if raw is None:
        return ErrorDetails(code=code, message=message)

    status = status_pb2.Status.FromString(raw)
    if status.code in _CODES_BY_VALUE:
        code = _CODES_BY_VALUE[status.code]
    message = status.message or message
    reason = domain = ""
    metadata: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    preconditions: list[tuple[str, str, str]] = []
    retry_after: float | None = None
    extra: list[any_pb2.Any] = []
    for item in status.details:
        if item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            item.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif item.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            item.Unpack(bad)
            fields.extend((v.field, v.description) for v in bad.field_violations)
        elif item.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pre = error_details_pb2.PreconditionFailure()
            item.Unpack(pre)
            preconditions.extend((v.type, v.subject, v.description) for v in pre.violations)
        elif item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            item.Unpack(retry)
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        else:
            extra.append(item)
    return ErrorDetails(
        code=code,
        message=message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(fields),
        precondition_violations=tuple(preconditions),
        retry_after_s=retry_after,
        extra=tuple(extra),
    )


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError) -> TesseraError:
    """A peer's failure as our own domain error, keeping its code, reason, metadata,
    field and precondition violations, retry delay and extra typed details, so a service
    can pass it on to its caller unchanged."""
    details = error_details(err)
    message = details.message or details.code.name
    common: dict[str, Any] = {
        "reason": details.reason or None,
        "metadata": details.metadata,
        "extra_details": details.extra,
    }
    if details.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message, field_violations=details.field_violations, **common)
    if details.code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(message, violations=details.precondition_violations, **common)
    retryable: dict[grpc.StatusCode, type[_Retryable]] = {
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.ABORTED: Aborted,
    }
    if details.code in retryable:
        return retryable[details.code](message, retry_after_s=details.retry_after_s, **common)
    simple: dict[grpc.StatusCode, type[TesseraError]] = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    }
    return simple.get(details.code, Internal)(message, **common)
