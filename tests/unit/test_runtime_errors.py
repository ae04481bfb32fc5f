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
    from_rpc_error,
    to_grpc_status,
    to_status,
    unpack_detail,
)
from tessera.v1 import tool_proxy_pb2


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


def _approval_required() -> FailedPrecondition:
    return FailedPrecondition(
        "billing.issue_refund needs a human approval",
        reason="APPROVAL_REQUIRED",
        violations=[("APPROVAL", "workflows/wf-1/gates/tool-1", "refund over 1000")],
        extra_details=[
            tool_proxy_pb2.ApprovalRequired(
                gate_id="tool-1", tool="billing.issue_refund", reason="refund over 1000"
            )
        ],
    )


def test_a_typed_detail_travels_after_the_standard_ones() -> None:
    status = to_status(_approval_required())
    assert [d.type_url.rsplit("/", 1)[1] for d in status.details] == [
        "google.rpc.ErrorInfo",
        "google.rpc.PreconditionFailure",
        "tessera.v1.ApprovalRequired",
    ]
    parsed = error_details(_FakeCall(to_grpc_status(_approval_required())))
    assert parsed.reason == "APPROVAL_REQUIRED"  # clients in other languages branch on it
    required = parsed.detail(tool_proxy_pb2.ApprovalRequired)
    assert required is not None
    assert (required.gate_id, required.tool) == ("tool-1", "billing.issue_refund")
    assert parsed.detail(tool_proxy_pb2.Approval) is None
    assert unpack_detail(parsed.extra, tool_proxy_pb2.ApprovalRequired) == required


def test_from_rpc_error_passes_every_detail_on_unchanged() -> None:
    """An agent re-raises a failed tool call with from_rpc_error; its caller (the
    coordinator) must see the very status the tool proxy sent."""
    first = to_status(_approval_required())
    passed_on = from_rpc_error(_FakeCall(to_grpc_status(_approval_required())))
    assert isinstance(passed_on, FailedPrecondition)
    again = to_status(passed_on)
    assert again == first
    detail = passed_on.detail(tool_proxy_pb2.ApprovalRequired)
    assert detail is not None and detail.gate_id == "tool-1"


def test_unknown_detail_types_are_kept_not_dropped() -> None:
    resource = error_details_pb2.ResourceInfo(
        resource_type="workflow", resource_name="workflows/wf-1"
    )
    status = to_status(NotFound("gone", extra_details=[resource]))
    parsed = error_details(_FakeCall(to_grpc_status(NotFound("gone", extra_details=[resource]))))
    assert parsed.detail(error_details_pb2.ResourceInfo) == resource
    passed_on = from_rpc_error(
        _FakeCall(to_grpc_status(NotFound("gone", extra_details=[resource])))
    )
    assert to_status(passed_on) == status
