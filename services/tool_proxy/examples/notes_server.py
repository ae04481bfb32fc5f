"""A tiny MCP server (mcp 2.x ``MCPServer``, formerly FastMCP) for demos and tests.

Run: ``python -m services.tool_proxy.examples.notes_server`` (stdio). Expose it to the
proxy with ``servers: {notes: {command: [python, -m, services.tool_proxy.examples.notes_server]}}``;
its tools become ``mcp.notes.echo`` and ``mcp.notes.word_count``. With ``--http
HOST:PORT`` it serves streamable HTTP at ``http://HOST:PORT/mcp`` instead
(``servers: {notes: {url: http://HOST:PORT/mcp}}``).
"""

from __future__ import annotations

import sys

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


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--http":
        host, _, port = argv[1].rpartition(":")
        server.run("streamable-http", host=host or "127.0.0.1", port=int(port))
    else:
        server.run("stdio")


if __name__ == "__main__":
    main(sys.argv[1:])
