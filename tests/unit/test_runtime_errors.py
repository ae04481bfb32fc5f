"""Domain errors ↔ google.rpc.Status, without a network."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tessera.runtime import errors
from tessera.runtime.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TesseraError,
    Unauthenticated,
    Unavailable,
    error_details,
    to_grpc_status,
    to_status,
)


class _FakeCall(grpc.RpcError):
    """What a sync grpc call error exposes (code, details, trailing metadata)."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self._status.trailing_metadata)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("m"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("m"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("m"), grpc.StatusCode.FAILED_PRECONDITION),
        (PermissionDenied("m"), grpc.StatusCode.PERMISSION_DENIED),
        (Unauthenticated("m"), grpc.StatusCode.UNAUTHENTICATED),
        (ResourceExhausted("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("m"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("m"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Aborted("m"), grpc.StatusCode.ABORTED),
        (Internal("m"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_carries_error_info_with_its_reason(
    exc: TesseraError, code: grpc.StatusCode
) -> None:
    status = to_status(exc)
    assert status.code == code.value[0]
    assert status.message == "m"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == code.name
    assert info.domain == "tessera"


def test_round_trip_through_grpc_status() -> None:
    exc = Unavailable(
        "policy service unreachable",
        reason="POLICY_UNAVAILABLE",
        retry_after_s=0.25,
        metadata={"dependency": "policy"},
    )
    status = to_grpc_status(exc)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert status.details == "policy service unreachable"
    parsed = error_details(_FakeCall(status))
    assert parsed == errors.ErrorDetails(
        code=grpc.StatusCode.UNAVAILABLE,
        message="policy service unreachable",
        reason="POLICY_UNAVAILABLE",
        domain="tessera",
        metadata={"dependency": "policy"},
        retry_after_s=0.25,
    )


def test_bad_request_and_precondition_details_round_trip() -> None:
    bad = error_details(
        _FakeCall(to_grpc_status(InvalidArgument("x", field_violations=[("a.b", "required")])))
    )
    assert bad.field_violations == (("a.b", "required"),)
    pre = error_details(
        _FakeCall(
            to_grpc_status(FailedPrecondition("y", violations=[("TOS", "user/1", "not accepted")]))
        )
    )
    assert pre.precondition_violations == (("TOS", "user/1", "not accepted"),)
    assert pre.reason == "FAILED_PRECONDITION"


def test_status_without_rich_details_still_parses() -> None:
    class Plain(_FakeCall):
        def __init__(self) -> None:
            pass

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.OUT_OF_RANGE

        def details(self) -> str:
            return "page out of range"

        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
            return ()

    parsed = error_details(Plain())
    assert parsed.code == grpc.StatusCode.OUT_OF_RANGE
    assert parsed.message == "page out of range"
    assert parsed.reason == ""
    assert parsed.field_violations == ()


def test_status_proto_is_what_google_clients_expect() -> None:
    raw = dict(to_grpc_status(NotFound("gone")).trailing_metadata)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert status.details[0].type_url == "type.googleapis.com/google.rpc.ErrorInfo"
