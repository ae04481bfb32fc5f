"""The MCP face: one MCP JSON-RPC message in, its JSON answer out (no I/O of its own but
the governed call), for people's MCP clients over streamable HTTP (``POST /mcp``).

Stateless: no session id, no server-initiated stream (Envoy answers ``GET``/``DELETE``
``/mcp`` with 405), one JSON response per request, nothing for a notification. The
handshake era of the protocol (``initialize``, versions ``HANDSHAKE_PROTOCOL_VERSIONS``
of ``mcp-types``): ``server/discover`` of the 2026 era is METHOD_NOT_FOUND, which makes
the ``mcp`` client's ``auto`` mode fall back to ``initialize``.

Hostile input is bounded before it is parsed: the body's size, no batches, the method
and tool name lengths; everything is validated with the ``mcp-types`` models. A refused
tool call is a tool error result (``isError``) naming the refusal (``_meta``
``tessera/error``: code, reason, metadata), never a crash; a completed one carries its
audit receipt in ``_meta``.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
import structlog
from google.protobuf import json_format
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError

from services.tool_proxy.person_calls import PersonCallResult, PersonCalls
from services.tool_proxy.policy_check import PolicyCheck
from services.tool_proxy.recording import Recorder
from services.tool_proxy.tools.registry import SideEffect, ToolRegistry
from tessera.runtime.errors import TesseraError
from tessera.runtime.principal import Principal
from tessera.v1 import policy_pb2

__all__ = ["IDEMPOTENCY_KEY_META", "McpFace"]

log = structlog.get_logger(__name__)

IDEMPOTENCY_KEY_META = "tessera/idempotencyKey"
"""Where a ``tools/call`` carries its idempotency key: ``params._meta``."""
_MAX_METHOD = 128
_MAX_TOOL_NAME = 200
_NEEDS_APPROVAL = " (needs another person's approval: the call answers which)"


def _dump(model: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(by_alias=True, mode="json", exclude_none=True)
    return dumped


def _error(request_id: types.RequestId | None, code: int, message: str, **data: Any) -> bytes:
    error = types.ErrorData(code=code, message=message, data=data or None)
    return _encode({"jsonrpc": "2.0", "id": request_id, "error": _dump(error)})


def _result(request_id: types.RequestId, result: dict[str, Any]) -> bytes:
    return _encode({"jsonrpc": "2.0", "id": request_id, "result": result})


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


class McpFace:
    def __init__(
        self,
        *,
        registry: ToolRegistry,
        calls: PersonCalls,
        policy: PolicyCheck,
        recorder: Recorder,
        max_message_bytes: int,
    ) -> None:
        self.registry = registry
        self.calls = calls
        self.policy = policy
        self.recorder = recorder
        self.max_message_bytes = max_message_bytes

    async def handle(
        self, body: bytes, principal: Principal, *, remaining_s: float | None
    ) -> bytes:
        """The answer to one message (empty for a notification or a response)."""
        if len(body) > self.max_message_bytes:
            return _error(
                None,
                types.INVALID_REQUEST,
                f"the message is {len(body)} bytes; the limit is {self.max_message_bytes}",
                reason="MESSAGE_TOO_LARGE",
            )
        try:
            raw = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return _error(None, types.PARSE_ERROR, f"the body is not JSON ({type(exc).__name__})")
        if isinstance(raw, list):
            return _error(
                None, types.INVALID_REQUEST, "batches are not supported: one message per POST"
            )
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        request_id = (
            raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
        )
        method = raw.get("method") if isinstance(raw, dict) else None
        if isinstance(method, str) and len(method) > _MAX_METHOD:
            return _error(request_id, types.INVALID_REQUEST, "the method name is too long")
        try:
            message = types.jsonrpc_message_adapter.validate_python(raw)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else ""
            return _error(
                request_id, types.INVALID_REQUEST, f"not a JSON-RPC 2.0 message ({where})"
            )
        if not isinstance(message, types.JSONRPCRequest):
            return b""  # a notification, or a response to nothing we asked
        params = message.params if isinstance(message.params, dict) else {}
        try:
            return await self._request(message.id, message.method, params, principal, remaining_s)
        except TesseraError as exc:  # the policy could not be asked (tools/list)
            return _error(message.id, types.INTERNAL_ERROR, exc.message, reason=exc.reason)

    async def _request(
        self,
        request_id: types.RequestId,
        method: str,
        params: dict[str, Any],
        principal: Principal,
        remaining_s: float | None,
    ) -> bytes:
        if method == "initialize":
            return _result(request_id, self._initialize(params))
        if method == "ping":
            return _result(request_id, {})
        if method == "tools/list":
            return _result(request_id, self._list_tools(principal))
        if method == "tools/call":
            return await self._call_tool(request_id, params, principal, remaining_s)
        return _error(request_id, types.METHOD_NOT_FOUND, f"method {method!r} is not served here")

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        asked = params.get("protocolVersion")
        version = asked if asked in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE_VERSION
        result = types.InitializeResult(
            protocol_version=version,
            capabilities=types.ServerCapabilities(tools=types.ToolsCapability(list_changed=False)),
            server_info=types.Implementation(name="tessera-tool-proxy", version="1"),
            instructions=(
                "Tessera's governed tools. Every call is decided by policy for you and "
                "audited; tools with side effects need `_meta` "
                f"`{IDEMPOTENCY_KEY_META}` and may need another person's approval."
            ),
        )
        return _dump(result)

    def _list_tools(self, principal: Principal) -> dict[str, Any]:
        """The tools the policy lets ``principal`` call (asked per tool, no approval);
        those that need an approval are listed and say so."""
        listed = []
        for name in self.registry.names():
            tool = self.registry.get(name)
            if tool is None:
                continue
            decision = self.policy.check_person(principal, tool, {}, "none").decision
            if decision not in (policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_APPROVAL_REQUIRED):
                continue
            spec = tool.spec
            needs_approval = decision == policy_pb2.DECISION_APPROVAL_REQUIRED
            listed.append(
                _dump(
                    types.Tool(
                        name=spec.name,
                        description=spec.description + (_NEEDS_APPROVAL if needs_approval else ""),
                        input_schema=dict(spec.input_schema),
                        annotations=types.ToolAnnotations(
                            read_only_hint=spec.side_effect is SideEffect.READ_ONLY,
                            idempotent_hint=spec.side_effect is not SideEffect.EXTERNAL_ACTION,
                            destructive_hint=spec.side_effect is SideEffect.EXTERNAL_ACTION,
                        ),
                        _meta={
                            "tessera/sideEffect": spec.side_effect.value,
                            "tessera/approvalRequired": needs_approval,
                        },
                    )
                )
            )
        return {"tools": listed}

    async def _call_tool(
        self,
        request_id: types.RequestId,
        params: dict[str, Any],
        principal: Principal,
        remaining_s: float | None,
    ) -> bytes:
        name = params.get("name")
        if isinstance(name, str) and len(name) > _MAX_TOOL_NAME:
            return _error(request_id, types.INVALID_PARAMS, "the tool name is too long")
        try:
            checked = types.CallToolRequestParams.model_validate(params)
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else ""
            return _error(request_id, types.INVALID_PARAMS, f"invalid tools/call params ({where})")
        meta = params.get("_meta")
        key = meta.get(IDEMPOTENCY_KEY_META, "") if isinstance(meta, dict) else ""
        if not isinstance(key, str):
            return _error(
                request_id, types.INVALID_PARAMS, f"_meta.{IDEMPOTENCY_KEY_META} must be a string"
            )
        call = self.calls.new_record(principal)
        try:
            done = await self.calls.call(
                principal,
                checked.name,
                dict(checked.arguments or {}),
                key,
                call,
                remaining_s=remaining_s,
            )
        except TesseraError as exc:
            await self.recorder.record_refusal(call, exc)
            return _result(request_id, self._refused(exc, call.receipt))
        return _result(request_id, self._succeeded(done))

    @staticmethod
    def _succeeded(done: PersonCallResult) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "tessera/decisionId": done.decision_id,
            "tessera/replayed": done.replayed,
        }
        if done.effect_id:
            meta["tessera/effectId"] = done.effect_id
        if done.receipt is not None:
            meta["tessera/receipt"] = json_format.MessageToDict(done.receipt)
        result = types.CallToolResult(
            content=[types.TextContent(type="text", text=json.dumps(done.result, sort_keys=True))],
            structured_content=done.result,
            is_error=False,
            _meta=meta,
        )
        return _dump(result)

    @staticmethod
    def _refused(exc: TesseraError, receipt: Any) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": exc.code.name,
            "reason": exc.reason,
            "metadata": dict(exc.metadata),
        }
        violations = getattr(exc, "field_violations", ())
        if violations:
            error["fieldViolations"] = [{"field": f, "description": d} for f, d in violations]
        meta: dict[str, Any] = {"tessera/error": error}
        if receipt is not None:
            meta["tessera/receipt"] = json_format.MessageToDict(receipt)
        text = f"{exc.reason}: {exc.message}"
        if violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in violations[:10]) + ")"
        result = types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], is_error=True, _meta=meta
        )
        return _dump(result)
