"""Who is asking: the verified principal behind a control-plane RPC.

People reach the mesh only through Envoy, which verifies their identity token (a JWT,
``jwt_authn``) and forwards its verified payload in :data:`CLAIMS_HEADER`. Envoy first
removes any copy of that header a client sent, and a server believes the header only when
the connection it came on is Envoy's own (its mTLS certificate is ``service/gateway``): a
process that calls a service directly cannot speak for anyone. Every other verified caller
is a workload and acts in its own name (the operator CLI, for one).

On a plaintext debug server nothing is authenticated (see
:attr:`tessera.runtime.config.CommonSettings.insecure_plaintext`): the header, when
present, is taken as it comes, and the principal says it is unverified.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from tessera.identity.names import WorkloadName
from tessera.runtime.errors import PermissionDenied, Unauthenticated
from tessera.runtime.grpc_authz import peer

__all__ = [
    "CLAIMS_HEADER",
    "GATEWAY",
    "SUBJECT_HEADER",
    "Principal",
    "encode_claims",
    "principal_of",
]

CLAIMS_HEADER = "x-tessera-claims"
"""The verified JWT payload (base64url JSON), set by Envoy's jwt_authn only."""
SUBJECT_HEADER = "x-tessera-subject"
"""The verified subject alone, for Envoy's own rate limits (keyed per person)."""
GATEWAY = WorkloadName("service", "gateway")
_MAX_CLAIMS_BYTES = 16 * 1024
_MAX_GROUPS = 256

Kind = Literal["user", "workload", "unverified"]


@dataclass(frozen=True)
class Principal:
    """``kind`` user (verified by the front door), workload (its certificate) or
    unverified (plaintext debug server)."""

    kind: Kind
    id: str
    groups: frozenset[str] = field(default_factory=frozenset)
    expire_time: float = 0.0
    """When a person's identity token expires (its ``exp``, seconds since the epoch);
    0 for workloads and tokens without one."""

    @property
    def name(self) -> str:
        """How audit records and ``decided_by`` name it: ``alice`` for a person,
        ``service/operator`` for a workload."""
        return self.id


def encode_claims(claims: dict[str, Any]) -> str:
    """``claims`` as Envoy forwards a verified payload (base64url JSON, no padding)."""
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")


def _claims(raw: str) -> dict[str, Any]:
    if len(raw) > _MAX_CLAIMS_BYTES:
        raise Unauthenticated("identity claims too large", reason="CLAIMS_INVALID")
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        claims = json.loads(decoded)
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated("identity claims unreadable", reason="CLAIMS_INVALID") from exc
    if not isinstance(claims, dict):
        raise Unauthenticated("identity claims are not an object", reason="CLAIMS_INVALID")
    return claims


def _user(claims: dict[str, Any], subject_claim: str, groups_claim: str, kind: Kind) -> Principal:
    subject = claims.get(subject_claim)
    if not isinstance(subject, str) or not subject or len(subject) > 256:
        raise Unauthenticated(
            f"the identity token has no usable {subject_claim!r} claim",
            reason="CLAIMS_INVALID",
            metadata={"claim": subject_claim},
        )
    groups = claims.get(groups_claim) or []
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, list) or len(groups) > _MAX_GROUPS:
        raise Unauthenticated("the identity token's groups are not a list", reason="CLAIMS_INVALID")
    exp = claims.get("exp")
    expire_time = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else 0.0
    return Principal(kind, subject, frozenset(g for g in groups if isinstance(g, str)), expire_time)


def principal_of(
    context: grpc.aio.ServicerContext,
    *,
    subject_claim: str = "preferred_username",
    groups_claim: str = "groups",
    gateway: WorkloadName = GATEWAY,
) -> Principal:
    """The principal of the RPC being handled (its caller was checked by
    :class:`~tessera.runtime.grpc_authz.CallerAuthorization` already).

    Raises:
        Unauthenticated: Envoy's call carries no usable claims (it always sends them for a
            verified token, so this is a misconfigured front door).
        PermissionDenied: a caller other than Envoy sent the claims header.
    """
    metadata: Sequence[tuple[str, Any]] = context.invocation_metadata() or ()
    raw = next((str(v) for k, v in metadata if k == CLAIMS_HEADER), None)
    caller = peer()
    if caller is None:  # plaintext debug server: nothing is verified
        if raw is None:
            return Principal("unverified", "anonymous")
        return _user(_claims(raw), subject_claim, groups_claim, "unverified")
    if caller.kind == gateway.kind and caller.name == gateway.name:
        if raw is None:
            raise Unauthenticated(
                "the front door sent no verified identity", reason="NO_HUMAN_IDENTITY"
            )
        return _user(_claims(raw), subject_claim, groups_claim, "user")
    if raw is not None:
        raise PermissionDenied(
            f"{caller} may not assert a person's identity: only the front door does",
            reason="CLAIMS_NOT_FROM_GATEWAY",
            metadata={"caller": caller.spiffe_id, "header": CLAIMS_HEADER},
        )
    return Principal("workload", f"{caller.kind}/{caller.name}")
