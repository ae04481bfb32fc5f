"""A2A's own errors, as the a2a-sdk's clients recognise them: ErrorInfo in domain
``a2a-protocol.org`` with A2A's reasons (``TASK_NOT_FOUND``...), on the gRPC codes its
binding names. Everything else the face answers is the coordinator's error unchanged."""

from __future__ import annotations

from typing import ClassVar

from tessera.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "A2A_DOMAIN",
    "ContentTypeNotSupported",
    "PushNotificationNotSupported",
    "TaskNotCancelable",
    "TaskNotFound",
    "UnsupportedOperation",
]

A2A_DOMAIN = "a2a-protocol.org"


class TaskNotFound(NotFound):
    domain: ClassVar[str] = A2A_DOMAIN
    default_reason = "TASK_NOT_FOUND"


class TaskNotCancelable(FailedPrecondition):
    domain: ClassVar[str] = A2A_DOMAIN
    default_reason = "TASK_NOT_CANCELABLE"


class PushNotificationNotSupported(FailedPrecondition):
    domain: ClassVar[str] = A2A_DOMAIN
    default_reason = "PUSH_NOTIFICATION_NOT_SUPPORTED"


class UnsupportedOperation(FailedPrecondition):
    domain: ClassVar[str] = A2A_DOMAIN
    default_reason = "UNSUPPORTED_OPERATION"


class ContentTypeNotSupported(InvalidArgument):
    domain: ClassVar[str] = A2A_DOMAIN

    def __init__(self, message: str, *, field: str, kind: str) -> None:
        super().__init__(
            message, reason="CONTENT_TYPE_NOT_SUPPORTED", field_violations=[(field, kind)]
        )
