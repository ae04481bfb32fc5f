"""MCP servers behind the tool proxy: listed with their schemas, governed like built-ins."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.tool_proxy.app import ToolProxy
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


@pytest.fixture(scope="module")
async def mcp_proxy(
    mesh: Mesh,  # noqa: F811
    nats_url: str,
    creds: dict[str, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tool_proxy_pb2_grpc.ToolProxyServiceStub]:
    config = tmp_path_factory.mktemp("mcp") / "servers.json"
    config.write_text(
        json.dumps(
            {
                "servers": {
                    "notes": {
                        "command": ["python", "-m", "services.tool_proxy.examples.notes_server"],
                        "category": "notes",
                    }
                }
            }
        )
    )
    settings = proxy_settings(
        nats_url,
        mesh.topology.namespace,
        mesh.forwarder.addr,
        creds,
        mesh.policy.address,
        mcp_servers=config,
    )
    proxy = ToolProxy(settings, replica_id="mcp")
    await proxy.start()
    technical = await agent_workload(mesh.vault_addr, mesh.creds, "technical")
    channel = proxy_channel(technical, proxy.address)  # the agent the tests' tokens name
    try:
        yield tool_proxy_pb2_grpc.ToolProxyServiceStub(channel)
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
    mcp_proxy: tool_proxy_pb2_grpc.ToolProxyServiceStub,
) -> None:
    page = await mcp_proxy.ListTools(tool_proxy_pb2.ListToolsRequest(page_size=500), timeout=5)
    tools = {t.name: t for t in page.tools}
    echo = tools["mcp.notes.echo"]
    assert echo.backend == tool_proxy_pb2.TOOL_BACKEND_KIND_MCP_STDIO
    assert "text" in echo.input_schema["properties"]
    assert echo.input_schema["additionalProperties"] is False


async def test_mcp_tool_runs_under_the_same_governance(
    mesh: Mesh,  # noqa: F811
    mcp_proxy: tool_proxy_pb2_grpc.ToolProxyServiceStub,
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["mcp.notes"], agent="technical")
    md = ((TOKEN_MD, token.token),)

    reply = await mcp_proxy.InvokeTool(
        _request(wf, task, "mcp.notes.word_count", {"text": "one two three"}),
        metadata=md,
        timeout=10,
    )
    assert reply.result["words"] == 3 and reply.decision_id

    bad = await refused(
        mcp_proxy.InvokeTool(
            _request(wf, task, "mcp.notes.echo", {"text": "x", "extra": 1}), metadata=md, timeout=5
        )
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT

    other_wf, other_task = new_ids()
    unscoped = await task_token(mesh, other_wf, other_task, tools=["kb.search"], agent="technical")
    denied = await refused(
        mcp_proxy.InvokeTool(
            _request(other_wf, other_task, "mcp.notes.echo", {"text": "x"}),
            metadata=((TOKEN_MD, unscoped.token),),
            timeout=5,
        )
    )
    assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TOOL_NOT_IN_SCOPE")
