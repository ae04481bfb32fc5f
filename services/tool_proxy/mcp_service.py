"""McpService RPCs (``proto/tessera/v1/mcp.proto``): the tool proxy's tools for people's
MCP clients, reached only through the front door (Envoy transcodes ``POST /mcp`` into
HandleMcpMessage, with the person's verified claims), and people's decisions on each
other's tool calls.

The principal is always the person (:func:`tessera.runtime.principal.principal_of`,
believed only from the gateway's mTLS identity), never a workload: a workload's call is
refused. The messages themselves are ``mcp_face.py``'s; the governed call
``person_calls.py``'s.
"""

from __future__ import annotations

import grpc
from google.api import httpbody_pb2

from services.tool_proxy.approval_flow import ApprovalFlow
from services.tool_proxy.mcp_face import McpFace
from services.tool_proxy.person_calls import PersonCalls
from services.tool_proxy.service import ToolProxyServicer
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tool_secrets import CallTokenMinter
from services.tool_proxy.wire import Malformed, safe_deserializer
from tessera.audit import AuditWriter
from tessera.policy.control_plane import ChainAuditor, ControlPlaneAuthorization
from tessera.policy.distribution import PolicySource
from tessera.runtime.errors import InvalidArgument, PermissionDenied, Unavailable
from tessera.runtime.principal import Principal
from tessera.v1 import mcp_pb2, mcp_pb2_grpc

__all__ = ["MCP_SERVICE_NAME", "McpServicer", "mcp_servicer", "register_mcp"]

MCP_SERVICE_NAME = mcp_pb2.DESCRIPTOR.services_by_name["McpService"].full_name

_JSON = "application/json"


class McpServicer(mcp_pb2_grpc.McpServiceServicer):
    """``authorization`` None: the proxy decides with the policy service (remote mode),
    which cannot decide for a person; every call is then refused (UNAVAILABLE)."""

    def __init__(
        self,
        *,
        face: McpFace,
        flow: ApprovalFlow,
        authorization: ControlPlaneAuthorization | None,
    ) -> None:
        self.face = face
        self.flow = flow
        self.authorization = authorization

    async def _person(self, context: grpc.aio.ServicerContext, method: str) -> Principal:
        if self.authorization is None:
            raise Unavailable(
                "people's tool calls are decided in-process: the proxy runs in remote policy mode",
                reason="POLICY_MODE_UNSUPPORTED",
            )
        principal = await self.authorization.principal(context, method)
        if principal.kind == "workload":
            raise PermissionDenied(
                f"the MCP face serves people; {principal.name} is a workload",
                reason="PEOPLE_ONLY",
                metadata={"principal": principal.name},
            )
        return principal

    async def HandleMcpMessage(
        self,
        request: mcp_pb2.HandleMcpMessageRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> httpbody_pb2.HttpBody:
        if isinstance(request, Malformed):
            raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
        principal = await self._person(context, "HandleMcpMessage")
        answer = await self.face.handle(
            request.http_body.data, principal, remaining_s=context.time_remaining()
        )
        return httpbody_pb2.HttpBody(content_type=_JSON, data=answer)

    async def DecideToolCallApproval(
        self,
        request: mcp_pb2.DecideToolCallApprovalRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> mcp_pb2.DecideToolCallApprovalResponse:
        principal = await self._person(context, "DecideToolCallApproval")
        assert self.authorization is not None
        return await self.flow.decide_person(request, principal, self.authorization)


def mcp_servicer(
    tool_proxy: ToolProxyServicer,
    *,
    settings: ToolProxySettings,
    minter: CallTokenMinter,
    policy_source: PolicySource | None,
    audit: AuditWriter,
) -> McpServicer:
    """The MCP face over the tool proxy's own pieces (its registry, governed steps, rate
    limits, approval flow, tool secrets and audit chain): one proxy, two doors.
    ``policy_source``: the in-process policy set (None in remote mode)."""
    calls = PersonCalls(
        registry=tool_proxy.registry,
        steps=tool_proxy.steps,
        limiter=tool_proxy.limiter,
        flow=tool_proxy.approval_flow,
        secrets=tool_proxy.secrets,
        minter=minter,
        recorder=tool_proxy.recorder,
    )
    face = McpFace(
        registry=tool_proxy.registry,
        calls=calls,
        policy=tool_proxy.approval_flow.policy,
        recorder=tool_proxy.recorder,
        max_message_bytes=settings.mcp_max_message_bytes,
    )
    authorization = (
        ControlPlaneAuthorization(policy_source, ChainAuditor(audit))
        if policy_source is not None
        else None
    )
    return McpServicer(face=face, flow=tool_proxy.approval_flow, authorization=authorization)


def register_mcp(server: grpc.aio.Server, servicer: McpServicer) -> None:
    """McpService with our own request decoding (undecodable bytes: INVALID_ARGUMENT)."""
    handlers = {
        "HandleMcpMessage": grpc.unary_unary_rpc_method_handler(
            servicer.HandleMcpMessage,
            request_deserializer=safe_deserializer(mcp_pb2.HandleMcpMessageRequest),
            response_serializer=httpbody_pb2.HttpBody.SerializeToString,
        ),
        "DecideToolCallApproval": grpc.unary_unary_rpc_method_handler(
            servicer.DecideToolCallApproval,
            request_deserializer=safe_deserializer(mcp_pb2.DecideToolCallApprovalRequest),
            response_serializer=mcp_pb2.DecideToolCallApprovalResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(MCP_SERVICE_NAME, handlers),)
    )
