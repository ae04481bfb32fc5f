"""The embedded policy decision point (``policy_mode = "embedded"``).

The same policy-as-code as the policy service, loaded, schema-validated and hot-reloaded by
the same :class:`~tessera.policy.store.PolicyStore` (on change, and at once on the policy
service's PolicyReloadRequested event, i.e. on ``tessera policy reload``), and the same
``CheckRequest`` → Cedar mapping (:mod:`tessera.policy.check`), evaluated in-process: no
gRPC hop and no separate decision record. The proxy audits the decision itself: its
``allow`` record (awaited before any tool runs) or its refusal record carries the decision
id, the determining policies and the policy set version.

Fail closed as in remote mode: only an explicit Cedar Allow allows (``evaluate``), and a
request Cedar cannot evaluate is a denial (remote mode maps the policy service's
INVALID_ARGUMENT the same way).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from tessera.policy.check import check_input, check_response
from tessera.policy.distribution import PolicySource
from tessera.policy.engine import (
    CheckInput,
    PolicyLoadError,
    RequestInvalid,
    evaluate,
)
from tessera.policy.store import PolicyStore
from tessera.runtime.bus import subscribe_events
from tessera.runtime.errors import InvalidArgument, PermissionDenied
from tessera.v1 import events_pb2, policy_pb2

__all__ = ["EmbeddedPolicy"]

log = structlog.get_logger(__name__)


class EmbeddedPolicy:
    """Decides ``CheckRequest``s against the source's current policy set."""

    def __init__(self, store: PolicySource) -> None:
        self.store = store
        self._sub: Subscription | None = None

    async def follow_reloads(self, nc: Client, subject: str) -> None:
        """Reload at once when the policy service announces a requested reload
        (``tessera policy reload``: PolicyReloadRequested), not only at the next poll."""

        store = self.store
        if not isinstance(store, PolicyStore):
            return  # a distributed set follows its bucket instead

        async def handle(event: events_pb2.PolicyReloadRequested) -> None:
            log.info("policy_reload_requested", announced=event.policy_set_version)
            with contextlib.suppress(PolicyLoadError):  # logged; the last good set serves on
                await store.reload()

        self._sub = await subscribe_events(nc, subject, events_pb2.PolicyReloadRequested, handle)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def check(self, request: policy_pb2.CheckRequest) -> policy_pb2.CheckResponse:
        """Decide a ``CheckRequest`` exactly as the policy service's ``Check`` would."""
        try:
            req = check_input(request)
        except InvalidArgument as exc:
            violations = exc.field_violations
            raise self._refused(str(uuid.uuid4()), request.resource.id, violations) from None
        return self.decide(req, tool=request.resource.id)

    def decide(self, req: CheckInput, *, tool: str) -> policy_pb2.CheckResponse:
        """Decide ``req`` (the values ``check_input`` would have read from a request)."""
        ps = self.store.current  # one whole set per decision (a reload swaps a reference)
        decision_id = str(uuid.uuid4())
        try:
            verdict = evaluate(ps, req, hour=datetime.now(UTC).hour)
        except RequestInvalid as exc:
            raise self._refused(decision_id, tool, exc.violations) from None
        return check_response(ps, verdict, decision_id)

    @staticmethod
    def _refused(
        decision_id: str, tool: str, violations: Sequence[tuple[str, str]]
    ) -> PermissionDenied:
        log.warning(
            "policy_check_invalid",
            decision_id=decision_id,
            tool=tool,
            violations=[f"{f}: {d}" for f, d in violations],
        )
        return PermissionDenied(
            "the policy refused to decide this call",
            reason="POLICY_DENIED",
            metadata={"policy_error": "INVALID_ARGUMENT", "decision_id": decision_id},
        )
