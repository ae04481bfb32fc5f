"""MCP servers behind the tool proxy, over stdio and over streamable HTTP: listed with
their schemas, governed like built-ins."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.tool_proxy.app import ToolProxy
from tessera.launcher.ports import free_port
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import tool_proxy_pb2, tool_proxy_pb2_grpc
from tests.integration.test_governed_calls import (  # noqa: F401 (fixtures)
    Mesh,
    agent_workload,
    bao,
    creds,
    mesh,
    new_ids,
    proxy_channel,
    proxy_settings,
    refused,
    task_token,
)

pytestmark = pytest.mark.integration

TOKEN_MD = TASK_TOKEN_METADATA


NOTES_SERVER = ["python", "-m", "services.tool_proxy.examples.notes_server"]
BACKENDS = {
    "stdio": tool_proxy_pb2.TOOL_BACKEND_KIND_MCP_STDIO,
    "http": tool_proxy_pb2.TOOL_BACKEND_KIND_MCP_HTTP,
}


@dataclass(frozen=True)
class McpProxy:
    stub: tool_proxy_pb2_grpc.ToolProxyServiceStub
    backend: int
    """How the proxy should report the notes tools' backend."""


@pytest.fixture(scope="module")
def notes_over_http() -> Iterator[str]:
    """The notes server on its own, speaking streamable HTTP: its URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, *NOTES_SERVER[1:], "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # until it accepts connections (or died)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "the notes server exited"
                assert time.monotonic() < deadline, "the notes server did not come up"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module", params=sorted(BACKENDS))
async def mcp_proxy(
    request: pytest.FixtureRequest,
    mesh: Mesh,  # noqa: F811
    nats_url: str,
    creds: dict[str, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[McpProxy]:
    """The tool proxy with the notes server behind it, over stdio and over streamable HTTP."""
    server: dict[str, Any] = {"category": "notes"}
    if request.param == "http":
        server["url"] = request.getfixturevalue("notes_over_http")
    else:
        server["command"] = NOTES_SERVER
    config = tmp_path_factory.mktemp("mcp") / "servers.json"
    config.write_text(json.dumps({"servers": {"notes": server}}))
    settings = proxy_settings(
        nats_url,
        mesh.topology.namespace,
        mesh.forwarder.addr,
        creds,
        mesh.policy.address,
        mcp_servers=config,
    )
    proxy = ToolProxy(settings, replica_id=f"mcp-{request.param}")
    await proxy.start()
    technical = await agent_workload(mesh.vault_addr, mesh.creds, "technical")
    channel = proxy_channel(technical, proxy.address)  # the agent the tests' tokens name
    try:
        yield McpProxy(tool_proxy_pb2_grpc.ToolProxyServiceStub(channel), BACKENDS[request.param])
    finally:
        await channel.close()
        await technical.close()
        await proxy.stop()


def _request(
    wf: str, task: str, tool: str, args: dict[str, Any]
) -> tool_proxy_pb2.InvokeToolRequest:
    request = tool_proxy_pb2.InvokeToolRequest(tool=tool)
    request.context.workflow_id, request.context.task_id = wf, task
    request.arguments.update(args)
    return request


async def test_mcp_tools_are_listed_with_their_schemas(
    mcp_proxy: McpProxy,
) -> None:
    page = await mcp_proxy.stub.ListTools(tool_proxy_pb2.ListToolsRequest(page_size=500), timeout=5)
    tools = {t.name: t for t in page.tools}
    echo = tools["mcp.notes.echo"]
    assert echo.backend == mcp_proxy.backend
    assert "text" in echo.input_schema["properties"]
    assert echo.input_schema["additionalProperties"] is False


async def test_mcp_tool_runs_under_the_same_governance(
    mesh: Mesh,  # noqa: F811
    mcp_proxy: McpProxy,
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["mcp.notes"], agent="technical")
    md = ((TOKEN_MD, token.token),)

    reply = await mcp_proxy.stub.InvokeTool(
        _request(wf, task, "mcp.notes.word_count", {"text": "one two three"}),
        metadata=md,
        timeout=10,
    )
    assert reply.result["words"] == 3 and reply.decision_id

    bad = await refused(
        mcp_proxy.stub.InvokeTool(
            _request(wf, task, "mcp.notes.echo", {"text": "x", "extra": 1}), metadata=md, timeout=5
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT

    other_wf, other_task = new_ids()
    unscoped = await task_token(mesh, other_wf, other_task, tools=["kb.search"], agent="technical")
    denied = await refused(
        mcp_proxy.stub.InvokeTool(
            _request(other_wf, other_task, "mcp.notes.echo", {"text": "x"}),
            metadata=((TOKEN_MD, unscoped.token),),
            timeout=5,
        )
    )
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TOOL_NOT_IN_SCOPE")
