"""What a tool is to the proxy, and the registry of every tool it can reach."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tessera.jsonschema import check_schema
from tessera.v1 import common_pb2, tool_proxy_pb2
from tessera.vault.naming import is_valid_tool_name
from tessera.vault.tokens import ToolSecret

__all__ = [
    "Backend",
    "CallInfo",
    "EffectLookup",
    "EffectStatus",
    "Lookup",
    "SideEffect",
    "Tool",
    "ToolError",
    "ToolRegistry",
    "ToolSpec",
]


class SideEffect(StrEnum):
    """What calling a tool does to the world (the policy sees the value)."""

    READ_ONLY = "read_only"
    IDEMPOTENT_WRITE = "idempotent_write"
    EXTERNAL_ACTION = "external_action"

    @property
    def proto(self) -> int:
        return {
            SideEffect.READ_ONLY: common_pb2.SIDE_EFFECT_CLASS_READ_ONLY,
            SideEffect.IDEMPOTENT_WRITE: common_pb2.SIDE_EFFECT_CLASS_IDEMPOTENT_WRITE,
            SideEffect.EXTERNAL_ACTION: common_pb2.SIDE_EFFECT_CLASS_EXTERNAL_ACTION,
        }[self]

    @property
    def needs_idempotency_key(self) -> bool:
        return self is not SideEffect.READ_ONLY


class Backend(StrEnum):
    BUILTIN = "builtin"
    MCP_STDIO = "mcp_stdio"
    MCP_HTTP = "mcp_http"
    A2A = "a2a"

    @property
    def proto(self) -> int:
        return {
            Backend.BUILTIN: tool_proxy_pb2.TOOL_BACKEND_KIND_BUILTIN,
            Backend.MCP_STDIO: tool_proxy_pb2.TOOL_BACKEND_KIND_MCP_STDIO,
            Backend.MCP_HTTP: tool_proxy_pb2.TOOL_BACKEND_KIND_MCP_HTTP,
            Backend.A2A: tool_proxy_pb2.TOOL_BACKEND_KIND_A2A,
        }[self]


class ToolError(Exception):
    """A backend refused or failed the call *without* performing its effect.

    ``message`` goes to the caller (never put a secret in it). Raising anything else
    from a backend is an internal error. ``retry_after_s`` set: nothing happened *yet*,
    and the same call may succeed later (the caller gets UNAVAILABLE with that RetryInfo,
    a transient fault, instead of FAILED_PRECONDITION).
    """

    def __init__(
        self, message: str, *, reason: str = "TOOL_FAILED", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a backend may know about the governed call it serves."""

    workflow_id: str
    task_id: str
    agent: str
    decision_id: str
    idempotency_key: str
    effect_id: str
    """Stable id of this effect: SHA-256(workflow|tool|idempotency_key). Backends use it
    to make their side effect idempotent (e.g. as Nats-Msg-Id)."""
    exchange: dict[str, Any] = field(default_factory=dict)
    """Filled by the backend: what its exchange with the remote system was (ids, final
    state; never a secret). The proxy puts it on the call's ``executed`` record, or on
    its refusal record when the backend failed."""


Handler = Callable[[Mapping[str, Any], ToolSecret | None, CallInfo], Awaitable[dict[str, Any]]]


class EffectStatus(StrEnum):
    """What a backend knows of one effect (by its effect id)."""

    EXECUTED = "executed"
    NOT_EXECUTED = "not_executed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class EffectLookup:
    """A backend's answer to "did the effect of this call happen?"."""

    status: EffectStatus
    result: Mapping[str, Any] | None = None
    """EXECUTED: what the call returned (or would have), replayed to the caller."""
    detail: str = ""
    """UNKNOWN: why not (logged; never a secret)."""

    @classmethod
    def executed(cls, result: Mapping[str, Any]) -> EffectLookup:
        return cls(EffectStatus.EXECUTED, result=result)

    @classmethod
    def not_executed(cls) -> EffectLookup:
        return cls(EffectStatus.NOT_EXECUTED)

    @classmethod
    def unknown(cls, detail: str) -> EffectLookup:
        return cls(EffectStatus.UNKNOWN, detail=detail)


Lookup = Callable[[CallInfo, float], Awaitable[EffectLookup]]
"""Optional backend capability: ``lookup(call, claimed_at)`` says whether the effect of
``call`` (its ``effect_id``) happened, at or after ``claimed_at`` (wall clock, seconds:
when the proxy first claimed it, so the effect cannot be older). Asked only when a claim
is taken over from an executor presumed dead. Answer NOT_EXECUTED only when certain (the
proxy then runs the call); UNKNOWN makes the proxy refuse the call until a human decides;
raising (or not answering within the tool's timeout) makes it answer UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool's declaration. ``scope`` is the Vault tool name whose policy and secret
    govern it (the tool itself for built-ins, ``mcp.<server>`` for MCP tools)."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    side_effect: SideEffect
    category: str
    pii: bool = False
    requires_secret: bool = True
    scope: str = ""
    backend: Backend = Backend.BUILTIN
    price: int = 0
    """Fixed price in cents handed to the policy as ``context.price`` (0: none; a
    ``price`` argument takes precedence)."""
    secret_fields: frozenset[str] = field(default_factory=frozenset)
    """Argument fields audited only as HMACs (on top of name-based detection)."""
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not is_valid_tool_name(self.name):
            raise ValueError(f"invalid tool name {self.name!r}")
        if not self.scope:
            object.__setattr__(self, "scope", self.name)
        if not is_valid_tool_name(self.scope):
            raise ValueError(f"invalid scope {self.scope!r} for tool {self.name!r}")
        # Refused at registration, naming where the schema is wrong, so that a call never
        # meets a schema the validator cannot use (raises SchemaError, a ValueError).
        check_schema(self.input_schema, path=f"{self.name}.input_schema")


@dataclass(frozen=True, slots=True)
class Tool:
    spec: ToolSpec
    handler: Handler
    lookup: Lookup | None = None
    """How the backend finds out whether an interrupted call's effect happened; without
    one, a side-effecting call whose executor died is never run again automatically."""


class ToolRegistry:
    """Tools by name. Registration happens at start-up (and in tests); lookups are
    lock-free dictionary reads on the hot path."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool, *, replace: bool = False) -> None:
        """Add ``tool``. Raises ValueError if the name is taken (unless ``replace``)."""
        if tool.spec.name in self._tools and not replace:
            raise ValueError(f"tool {tool.spec.name!r} is already registered")
        self._tools[tool.spec.name] = tool

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        """Tool names, sorted (the ListTools order)."""
        return sorted(self._tools)

    def __len__(self) -> int:
        return len(self._tools)
