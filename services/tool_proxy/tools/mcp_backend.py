"""MCP servers as tool backends (the ``mcp`` package, protocol client).

Configuration (``TESSERA_TOOL_PROXY_MCP_SERVERS``: a JSON or YAML file)::

    servers:
      example:                          # server name: [a-z][a-z0-9_]*
        command: [python, -m, services.tool_proxy.examples.notes_server]  # stdio, or
        # url: https://mcp.example.com/mcp                                # streamable HTTP
        env: {}                         # extra environment for a stdio server
        category: mcp                   # policy attribute of its tools
        timeout_s: 10                   # per call (the caller's deadline bounds it further)
        requires_secret: true           # read tool-secrets/mcp-<server> with the caller's token
        strict_schemas: true            # close schemas that say neither additionalProperties
                                        # nor unevaluatedProperties
        tools:                          # optional per-tool overrides
          add_note: {side_effect: external_action, pii: false}

Each server tool ``t`` becomes ``mcp.<server>.<t>`` (lower-cased, other characters → ``_``)
and is governed exactly like a built-in: its Vault scope is ``mcp.<server>`` (one secret
and one ``tool-mcp-<server>`` policy per server, listed in ``vault/tools.yaml``), the
policy sees it as a Tool with the side-effect class from the override, else from the MCP
annotations (readOnlyHint → read_only, idempotentHint → idempotent_write, otherwise
external_action). The per-server secret gates access through Vault; it is not forwarded
to the server, which holds its own upstream credentials.

Each connection lives in its own task (anyio's cancel scopes must be entered and left in
one task); calls from request handlers go through the shared session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from services.tool_proxy.tools.registry import (
    Backend,
    CallInfo,
    SideEffect,
    Tool,
    ToolError,
    ToolSpec,
)
from tessera.jsonschema import SchemaError
from tessera.vault.naming import is_valid_tool_name
from tessera.vault.tokens import ToolSecret

__all__ = ["McpServerConfig", "McpServers", "load_config"]

log = structlog.get_logger(__name__)

_SERVER_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: tuple[str, ...] = ()
    url: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    category: str = "mcp"
    timeout_s: float = 10.0
    requires_secret: bool = True
    strict_schemas: bool = True
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def backend(self) -> Backend:
        return Backend.MCP_HTTP if self.url else Backend.MCP_STDIO


def load_config(path: Path) -> list[McpServerConfig]:
    """Parse the servers file. Raises ValueError naming the problem."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    servers = (data or {}).get("servers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"{path}: expected a 'servers' mapping")
    out: list[McpServerConfig] = []
    for name, raw in servers.items():
        if not isinstance(name, str) or not _SERVER_RE.fullmatch(name):
            raise ValueError(f"{path}: invalid MCP server name {name!r}")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: server {name!r} must be a mapping")
        command = raw.get("command") or ()
        if isinstance(command, str):
            command = (command,)
        url = str(raw.get("url") or "")
        if bool(command) == bool(url):
            raise ValueError(f"{path}: server {name!r} needs exactly one of command or url")
        out.append(
            McpServerConfig(
                name=name,
                command=tuple(str(c) for c in command),
                url=url,
                env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
                category=str(raw.get("category", "mcp")),
                timeout_s=float(raw.get("timeout_s", 10.0)),
                requires_secret=bool(raw.get("requires_secret", True)),
                strict_schemas=bool(raw.get("strict_schemas", True)),
                overrides=dict(raw.get("tools") or {}),
            )
        )
    return out


def _tool_name(server: str, tool: str) -> str | None:
    local = re.sub(r"[^a-z0-9_]", "_", tool.lower()).strip("_")
    if not local or not local[0].isalpha():
        return None
    name = f"mcp.{server}.{local}"
    return name if is_valid_tool_name(name) else None


def _side_effect(annotations: Any, override: Mapping[str, Any]) -> SideEffect:
    if "side_effect" in override:
        return SideEffect(str(override["side_effect"]))
    if annotations is not None:
        if getattr(annotations, "read_only_hint", None):
            return SideEffect.READ_ONLY
        if getattr(annotations, "idempotent_hint", None):
            return SideEffect.IDEMPOTENT_WRITE
    return SideEffect.EXTERNAL_ACTION


def _result_dict(result: Any) -> dict[str, Any]:
    structured = getattr(result, "structured_content", None)
    out: dict[str, Any] = {}
    if isinstance(structured, dict):
        out.update(structured)
    elif structured is not None:
        out["result"] = structured
    texts = [
        block.text for block in (getattr(result, "content", None) or []) if hasattr(block, "text")
    ]
    if texts and not out:
        out["text"] = "\n".join(texts)
    return out


class _Connection:
    """One MCP server: a client session owned by a background task."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self.client: Any = None
        self._ready: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float) -> list[Any]:
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"mcp:{self.config.name}")
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(self._ready)
            listed = await self.client.list_tools()
        tools = list(listed.tools)
        cursor = getattr(listed, "next_cursor", None)
        while cursor:
            async with asyncio.timeout(timeout_s):
                page = await self.client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = getattr(page, "next_cursor", None)
        return tools

    async def _run(self) -> None:
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters

        assert self._ready is not None
        cfg = self.config
        target: Any
        if cfg.url:
            target = cfg.url
        else:
            command = cfg.command[0]
            if command in ("python", "python3"):
                command = sys.executable  # the proxy's own interpreter (its venv)
            target = StdioServerParameters(
                command=command, args=list(cfg.command[1:]), env=dict(cfg.env) or None
            )
        try:
            async with Client(target, cache=None) as client:
                self.client = client
                self._ready.set_result(None)
                await self._stop.wait()
        except Exception as exc:
            log.error("mcp_server_failed", server=cfg.name, error=repr(exc))
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            self.client = None

    async def call(self, tool: str, arguments: Mapping[str, Any], meta: dict[str, Any]) -> Any:
        client = self.client
        if client is None:
            raise ToolError(
                f"MCP server {self.config.name!r} is not connected", reason="TOOL_UNAVAILABLE"
            )
        return await client.call_tool(tool, dict(arguments), meta=meta)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task


class McpServers:
    """Every configured MCP server, connected at start and exposed as tools."""

    def __init__(self, configs: list[McpServerConfig], *, timeout_s: float = 15.0) -> None:
        self._connections = [_Connection(c) for c in configs]
        self._timeout_s = timeout_s

    @classmethod
    def from_file(cls, path: Path, *, timeout_s: float = 15.0) -> McpServers:
        return cls(load_config(path), timeout_s=timeout_s)

    async def start(self) -> list[Tool]:
        """Connect every server and list its tools (a server that fails fails the start)."""
        tools: list[Tool] = []
        for conn in self._connections:
            listed = await conn.start(self._timeout_s)
            for mcp_tool in listed:
                tool = self._tool(conn, mcp_tool)
                if tool is not None:
                    tools.append(tool)
            log.info("mcp_server_connected", server=conn.config.name, tools=len(listed))
        return tools

    async def stop(self) -> None:
        for conn in self._connections:
            await conn.stop()

    def _tool(self, conn: _Connection, mcp_tool: Any) -> Tool | None:
        cfg = conn.config
        name = _tool_name(cfg.name, mcp_tool.name)
        if name is None:
            log.warning("mcp_tool_skipped", server=cfg.name, reason="unmappable name")
            return None
        override = dict(cfg.overrides.get(mcp_tool.name) or {})
        schema = dict(mcp_tool.input_schema or {"type": "object"})
        # A schema closed with unevaluatedProperties (allOf composition) is closed already;
        # additionalProperties there would refuse the properties its branches declare.
        if cfg.strict_schemas and not {"additionalProperties", "unevaluatedProperties"} & set(
            schema
        ):
            schema["additionalProperties"] = False
        remote = mcp_tool.name
        try:
            spec = ToolSpec(
                name=name,
                description=(mcp_tool.description or "")[:2000],
                input_schema=schema,
                side_effect=_side_effect(getattr(mcp_tool, "annotations", None), override),
                category=str(override.get("category", cfg.category)),
                pii=bool(override.get("pii", False)),
                requires_secret=cfg.requires_secret,
                scope=f"mcp.{cfg.name}",
                backend=cfg.backend,
                timeout_s=cfg.timeout_s,
            )
        except SchemaError as exc:
            # A server's schema is its own affair: its other tools stay usable, this one
            # is not offered (arguments could not be checked against it).
            log.warning(
                "mcp_tool_skipped",
                server=cfg.name,
                reason="invalid input schema",
                problems=[str(v) for v in exc.violations[:5]],
            )
            return None

        async def handler(
            arguments: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
        ) -> dict[str, Any]:
            meta = {"tessera/effect_id": call.effect_id, "tessera/workflow_id": call.workflow_id}
            result = await conn.call(remote, arguments, meta)
            if getattr(result, "is_error", False):
                raise ToolError(f"{name} failed", reason="TOOL_FAILED")
            return _result_dict(result)

        return Tool(spec, handler)
