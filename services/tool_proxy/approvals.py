"""The approvals of tool calls: the tool proxy's own state (KV bucket ``<ns>_approvals``),
written by no other service (see README.md, "Approval contract").

Key ``<workflow_id>.<gate_id>`` with
``gate_id = "tool-" + sha256(f"{task_id}|{tool}|{idempotency_key}").hexdigest()[:16]``.
The proxy creates ``{"state": "pending", "tool", "task_id", "reason",
"arguments_digest"}`` when the policy asks for an approval; a human decision, reaching the
proxy through ``ToolProxyService.DecideApproval``, turns it into ``"state": "approved" |
"rejected"`` with ``decided_by``, keeping the rest (the digest is how the retried call is
checked to be the one approved). A decided record never changes again.

People's calls over MCP (``person_calls.py``) keep theirs under the workflow id
``people`` (:data:`PEOPLE`), gate ``mcp-<16 hex>`` (:func:`person_gate_id`), with
``requested_by`` (the person) in the record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tessera.runtime.errors import Aborted, FailedPrecondition, NotFound, Unavailable

__all__ = [
    "APPROVED",
    "PENDING",
    "PEOPLE",
    "REJECTED",
    "ApprovalStore",
    "Decided",
    "gate_id",
    "person_gate_id",
]

PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
PEOPLE = "people"
"""The workflow id under which people's tool calls (over MCP) keep their approvals."""
_DECIDE_ATTEMPTS = 16


def gate_id(task_id: str, tool: str, idempotency_key: str) -> str:
    return "tool-" + hashlib.sha256(f"{task_id}|{tool}|{idempotency_key}".encode()).hexdigest()[:16]


def person_gate_id(person: str, tool: str, idempotency_key: str) -> str:
    """The approval of a person's call: one per person, tool and idempotency key."""
    digest = hashlib.sha256(f"{person}|{tool}|{idempotency_key}".encode()).hexdigest()
    return "mcp-" + digest[:16]


def _unavailable() -> Unavailable:
    return Unavailable(
        "approvals store unavailable", reason="APPROVALS_UNAVAILABLE", retry_after_s=1.0
    )


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision as stored; ``repeated``: it was stored before (nothing changed now)."""

    record: dict[str, Any]
    repeated: bool


class ApprovalStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @staticmethod
    def key(workflow_id: str, gate: str) -> str:
        return f"{workflow_id}.{gate}"

    async def get(self, workflow_id: str, gate: str) -> dict[str, Any] | None:
        found = await self._entry(workflow_id, gate)
        return None if found is None else found[0]

    async def _entry(self, workflow_id: str, gate: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await self._kv.get(self.key(workflow_id, gate))
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise _unavailable() from exc
        value = json.loads(entry.value or b"{}")
        return (value if isinstance(value, dict) else {}), entry.revision or 0

    async def request(
        self,
        workflow_id: str,
        gate: str,
        *,
        tool: str,
        task_id: str,
        reason: str,
        arguments_digest: str,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create the pending record unless one exists; the record now stored. ``extra``:
        more fields of the record (a person's call: ``requested_by``, the tool's
        ``side_effect`` and ``category``, which its approvers' policy reads)."""
        record = {
            **dict(extra or {}),
            "state": PENDING,
            "tool": tool,
            "task_id": task_id,
            "reason": reason,
            "arguments_digest": arguments_digest,
        }
        try:
            await self._kv.create(
                self.key(workflow_id, gate), json.dumps(record, sort_keys=True).encode()
            )
            return record
        except KeyWrongLastSequenceError:
            existing = await self.get(workflow_id, gate)
            return existing if existing is not None else record
        except Exception as exc:
            raise _unavailable() from exc

    async def decide(self, workflow_id: str, gate: str, *, state: str, decided_by: str) -> Decided:
        """Turn the pending record into ``state`` (APPROVED or REJECTED) by
        ``decided_by``, with compare-and-set. The same decision again (same state, same
        person) is answered with the stored record; any other decision on a decided
        record is FAILED_PRECONDITION ``APPROVAL_ALREADY_DECIDED``; no record is
        NOT_FOUND ``APPROVAL_NOT_FOUND``."""
        if state not in (APPROVED, REJECTED):
            raise ValueError(f"not a decision: {state!r}")
        key = self.key(workflow_id, gate)
        for _ in range(_DECIDE_ATTEMPTS):
            found = await self._entry(workflow_id, gate)
            if found is None:
                raise NotFound(
                    f"no approval is pending for gate {gate} of workflow {workflow_id}",
                    reason="APPROVAL_NOT_FOUND",
                    metadata={"workflow_id": workflow_id, "gate": gate},
                )
            record, revision = found
            current = record.get("state")
            if current != PENDING:
                if current == state and record.get("decided_by") == decided_by:
                    return Decided(record, repeated=True)
                raise FailedPrecondition(
                    f"gate {gate} was already decided ({current})",
                    reason="APPROVAL_ALREADY_DECIDED",
                    metadata={
                        "gate": gate,
                        "state": str(current),
                        "decided_by": str(record.get("decided_by", "")),
                    },
                    violations=[
                        ("APPROVAL_STATE", f"workflows/{workflow_id}/gates/{gate}", str(current))
                    ],
                )
            decided = {**record, "state": state, "decided_by": decided_by}
            try:
                await self._kv.update(
                    key, json.dumps(decided, sort_keys=True).encode(), last=revision
                )
            except KeyWrongLastSequenceError:
                continue  # decided concurrently: look again
            except Exception as exc:
                raise _unavailable() from exc
            return Decided(decided, repeated=False)
        raise Aborted(
            f"gate {gate} kept changing; retry", reason="CONCURRENT_UPDATE", retry_after_s=0.1
        )
