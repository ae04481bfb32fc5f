"""Tools the proxy can reach: the registry, built-ins and MCP servers."""

from services.tool_proxy.tools.registry import (
    Backend,
    CallInfo,
    SideEffect,
    Tool,
    ToolError,
    ToolRegistry,
    ToolSpec,
)

__all__ = ["Backend", "CallInfo", "SideEffect", "Tool", "ToolError", "ToolRegistry", "ToolSpec"]
