"""The governed steps of a tool call, whoever asks: an agent with its task token
(``pipeline.py``) or a person over MCP (``person_calls.py``).

Arguments (size, hostile input, JSON Schema), the idempotency key, the backend's
deadline, the idempotency claim (replay of a completed effect, takeover of a dead
executor's claim only after asking the tool) and the backend run with its outcome
recorded. The principal-specific steps (task tokens, the use ledger, who the policy
decides for) stay with each caller's path.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from google.protobuf import json_format, struct_pb2

from services.tool_proxy.execution import Execution, execute
from services.tool_proxy.idempotency import Claim, IdempotencyStore, Replay
from services.tool_proxy.recording import CallRecord, Recorder
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tools.registry import CallInfo, Tool, ToolSpec
from tessera.jsonschema import Limits, SchemaError, validate
from tessera.runtime.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted

__all__ = ["GovernedSteps"]

_IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_CALL_MARGIN_S = 0.02
_LEASE_MARGIN_S = 1.0


class GovernedSteps:
    """Steps 5, 8 and 10-11 of README.md's table, shared by every kind of caller."""

    def __init__(
        self, *, settings: ToolProxySettings, idempotency: IdempotencyStore, recorder: Recorder
    ) -> None:
        self.settings = settings
        self.idempotency = idempotency
        self.recorder = recorder
        self._limits = Limits(
            max_depth=settings.max_argument_depth, max_string_length=settings.max_string_length
        )

    # -- 5. arguments and the idempotency key --------------------------------------------
    def arguments(self, arguments: struct_pb2.Struct, tool: Tool) -> dict[str, Any]:
        """The call's arguments as JSON values: within the size limit, free of hostile
        input and valid for the tool's schema (else a refusal naming the fields)."""
        size = arguments.ByteSize()
        if size > self.settings.max_argument_bytes:
            raise ResourceExhausted(
                f"arguments are {size} bytes; the limit is {self.settings.max_argument_bytes}",
                reason="ARGUMENTS_TOO_LARGE",
            )
        try:
            values: dict[str, Any] = json_format.MessageToDict(arguments)
        except (ValueError, RecursionError, json_format.Error) as exc:
            raise InvalidArgument(
                "arguments are not valid JSON values",
                reason="ARGUMENTS_INVALID",
                field_violations=[("arguments", type(exc).__name__)],
            ) from None
        try:
            violations = validate(
                values, tool.spec.input_schema, path="arguments", limits=self._limits
            )
        except SchemaError as exc:
            # ToolSpec checked the schema; only a $ref cycle a value reveals gets here. The
            # tool's fault, not the caller's: no field violations for the caller to fix.
            raise Internal(
                f"the input schema of {tool.spec.name!r} is unusable",
                reason="TOOL_SCHEMA_INVALID",
                metadata={"tool": tool.spec.name, "problem": str(exc)[:200]},
            ) from None
        if violations:
            raise InvalidArgument(
                f"arguments do not satisfy the schema of {tool.spec.name!r}",
                reason="ARGUMENTS_INVALID",
                field_violations=[(v.path, v.description) for v in violations[:50]],
            )
        return values

    @staticmethod
    def check_idempotency_key(spec: ToolSpec, key: str, *, field: str = "idempotency_key") -> None:
        """A well-formed key, and one at all for a tool with side effects."""
        if key and not _IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                "invalid idempotency key",
                field_violations=[(field, "1-128 chars of [A-Za-z0-9._:@/+=-]")],
            )
        if spec.side_effect.needs_idempotency_key and not key:
            raise InvalidArgument(
                f"{spec.name!r} has side effects: an idempotency key is required",
                reason="IDEMPOTENCY_KEY_REQUIRED",
                field_violations=[(field, "required for side-effecting tools")],
            )

    # -- 8. the idempotency claim --------------------------------------------------------
    async def begin_effect(
        self, eid: str, *, tool: Tool, info: CallInfo, digest: str, timeout_s: float
    ) -> Claim | Replay:
        """Claim effect ``eid`` for as long as this call may run the backend (if this
        replica dies, a retry takes over soon after), or the completed effect's replay;
        a claim whose executor died is taken over only if the tool says its effect did
        not happen."""
        return await self.idempotency.begin(
            eid,
            tool=tool.spec.name,
            arguments_digest=digest,
            decision_id=info.decision_id,
            lease_s=timeout_s + _LEASE_MARGIN_S,
            lookup=functools.partial(tool.lookup, info) if tool.lookup else None,
            lookup_timeout_s=timeout_s,
        )

    # -- 10-11. the backend and its outcome ------------------------------------------------
    def backend_timeout(self, remaining: float | None, tool: Tool) -> float:
        """The backend's timeout: the tool's own, within what is left of the call's
        deadline (``remaining``, seconds; None: the call has none)."""
        timeout = tool.spec.timeout_s or self.settings.backend_timeout_s
        if remaining is not None:
            timeout = min(timeout, remaining - _CALL_MARGIN_S)
        if timeout <= 0:
            raise DeadlineExceeded("no time left to call the tool", reason="DEADLINE_EXCEEDED")
        return timeout

    async def execute(self, run: Execution, call: CallRecord) -> dict[str, Any]:
        """The backend under its deadline, its outcome recorded, then the ``executed``
        audit record (deferred, with back-pressure). What the backend's exchange was
        (remote ids, final state: ``CallInfo.exchange``) goes on the ``executed`` record,
        or on the refusal record if the backend failed."""
        try:
            result = await execute(
                run, store=self.idempotency, max_result_bytes=self.settings.max_result_bytes
            )
        finally:
            if run.info.exchange:
                call.details["exchange"] = dict(run.info.exchange)
        await self.recorder.record_executed(call)
        return result
