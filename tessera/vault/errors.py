"""Errors raised by :mod:`tessera.vault`.

Each is a :class:`~tessera.runtime.errors.TesseraError` of the matching gRPC kind (so the
error interceptor maps it to a status with a stable ``reason``) and a :class:`VaultError`
(so Vault-specific handling can catch them all). Callers may rely on the class and the
``reason``, never on the message text. No message ever contains a token, a secret_id or a
secret value.
"""

from __future__ import annotations

import grpc

from tessera.runtime.errors import (
    FailedPrecondition,
    PermissionDenied,
    TesseraError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "InvalidToken",
    "ToolSecretNotFound",
    "VaultConfigError",
    "VaultError",
    "VaultPermissionDenied",
    "VaultUnavailable",
]


class VaultError(TesseraError):
    """Base class of every error this package raises; INTERNAL unless a subclass says."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "VAULT_ERROR"


class VaultUnavailable(Unavailable, VaultError):
    """Vault could not be reached, or answered 5xx, after bounded retries. Fail closed."""

    default_reason = "VAULT_UNAVAILABLE"


class VaultPermissionDenied(PermissionDenied, VaultError):
    """Vault answered 403: the token used does not grant this operation."""

    default_reason = "VAULT_PERMISSION_DENIED"


class InvalidToken(Unauthenticated, VaultError):
    """The token presented is malformed, unknown, expired, revoked or out of uses."""

    default_reason = "INVALID_TOKEN"


class ToolSecretNotFound(FailedPrecondition, VaultError):
    """The caller may read the tool's secret path, but no secret was written there."""

    default_reason = "TOOL_SECRET_MISSING"


class VaultConfigError(FailedPrecondition, VaultError):
    """The Vault-as-code directory is invalid, or Vault's state conflicts with it."""

    default_reason = "VAULT_CONFIG_INVALID"
