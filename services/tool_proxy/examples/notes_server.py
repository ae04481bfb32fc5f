"""A tiny stdio MCP server (mcp 2.x ``MCPServer``, formerly FastMCP) for demos and tests.

Run: ``python -m services.tool_proxy.examples.notes_server``. Expose it to the proxy with
``servers: {notes: {command: [python, -m, services.tool_proxy.examples.notes_server]}}``;
its tools become ``mcp.notes.echo`` and ``mcp.notes.word_count``.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("notes")


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def echo(text: str) -> dict[str, str]:
    """Return the text unchanged."""
    return {"echo": text}


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def word_count(text: str) -> dict[str, int]:
    """Count the words of a text."""
    return {"words": len(text.split())}


if __name__ == "__main__":
    server.run("stdio")
