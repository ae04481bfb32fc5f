"""gRPC metadata keys that are part of the mesh's contracts (documented in ``proto/``).

Defined once here: the agent SDK sends them, the services read them, tests use them.
"""

from __future__ import annotations

__all__ = ["TASK_TOKEN_METADATA"]

TASK_TOKEN_METADATA = "x-tessera-task-token"
"""The request metadata key that carries a task token to the tool proxy (see the
``ToolProxyService`` comments in ``proto/tessera/v1/tool_proxy.proto``)."""
