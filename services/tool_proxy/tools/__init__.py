"""Tools the proxy can reach: the registry, built-ins and MCP servers."""

from services.tool_proxy.tools.registry import (
    Backend,
    CallInfo,
    EffectLookup,
    EffectStatus,
    Lookup,
    SideEffect,
    Tool,
    ToolError,
    ToolRegistry,
    ToolSpec,
)

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
