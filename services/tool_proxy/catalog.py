"""ListTools: the tools the proxy can reach, paged by name."""

from __future__ import annotations

import base64
import json

from services.tool_proxy.tools.registry import ToolRegistry
from services.tool_proxy.wire import Malformed, to_struct
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import tool_proxy_pb2

__all__ = ["MAX_PAGE", "list_tools"]

MAX_PAGE = 500


def list_tools(
    registry: ToolRegistry, request: tool_proxy_pb2.ListToolsRequest | Malformed
) -> tool_proxy_pb2.ListToolsResponse:
    if isinstance(request, Malformed):
        raise InvalidArgument("request does not decode", reason="MALFORMED_REQUEST")
    if request.page_size < 0:
        raise InvalidArgument(
            "page_size must not be negative", field_violations=[("page_size", "must be >= 0")]
        )
    size = min(request.page_size or 100, MAX_PAGE)
    after = ""
    if request.page_token:
        try:
            after = json.loads(base64.urlsafe_b64decode(request.page_token))["after"]
            if not isinstance(after, str):
                raise TypeError("after")
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(
                "invalid page_token", field_violations=[("page_token", type(exc).__name__)]
            ) from None
    names = [n for n in registry.names() if n > after]
    page = names[:size]
    response = tool_proxy_pb2.ListToolsResponse()
    for name in page:
        tool = registry.get(name)
        if tool is None:
            continue
        spec = tool.spec
        response.tools.append(
            tool_proxy_pb2.Tool(
                name=spec.name,
                description=spec.description,
                input_schema=to_struct(dict(spec.input_schema)),
                side_effect_class=spec.side_effect.proto,  # type: ignore[arg-type]
                backend=spec.backend.proto,  # type: ignore[arg-type]
                requires_secret=spec.requires_secret,
            )
        )
    if len(names) > size:
        response.next_page_token = base64.urlsafe_b64encode(
            json.dumps({"after": page[-1]}).encode()
        ).decode()
    return response
