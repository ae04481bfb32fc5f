"""The tool proxy's half of the tool-approval contract (see README.md).

KV bucket ``<ns>_approvals``, key ``<workflow_id>.<gate_id>`` with
``gate_id = "tool-" + sha256(f"{task_id}|{tool}|{idempotency_key}").hexdigest()[:16]``.
The proxy creates ``{"state": "pending", "tool", "task_id", "reason",
"arguments_digest"}``; the coordinator writes ``"state": "approved" | "rejected"`` into the
same key after the human decision.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tessera.runtime.errors import Unavailable

__all__ = ["ApprovalStore", "gate_id"]

PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"


def gate_id(task_id: str, tool: str, idempotency_key: str) -> str:
    return "tool-" + hashlib.sha256(f"{task_id}|{tool}|{idempotency_key}".encode()).hexdigest()[:16]


class ApprovalStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @staticmethod
    def key(workflow_id: str, gate: str) -> str:
        return f"{workflow_id}.{gate}"

    async def get(self, workflow_id: str, gate: str) -> dict[str, Any] | None:
        try:
            entry = await self._kv.get(self.key(workflow_id, gate))
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise Unavailable(
                "approvals store unavailable", reason="APPROVALS_UNAVAILABLE", retry_after_s=1.0
            ) from exc
        value = json.loads(entry.value or b"{}")
        return value if isinstance(value, dict) else {}

    async def request(
        self,
        workflow_id: str,
        gate: str,
        *,
        tool: str,
        task_id: str,
        reason: str,
        arguments_digest: str,
    ) -> dict[str, Any]:
        """Create the pending record unless one exists; the record now stored."""
        record = {
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
            raise Unavailable(
                "approvals store unavailable", reason="APPROVALS_UNAVAILABLE", retry_after_s=1.0
            ) from exc
