"""External A2A agents as tool backends (the ``a2a-sdk`` client, JSON-RPC or HTTP+JSON).

Each agent declared in ``TESSERA_A2A_AGENTS_FILE`` (format: ``tessera/a2a_agents.py``)
becomes the tool ``a2a.<name>``, scope ``a2a.<name>`` (its Vault policy
``tool-a2a-<name>`` is created by the bootstrap from the same file), governed exactly
like a built-in: token, scope, arguments, rate limits, Cedar, idempotency, use budget,
the awaited ``allow`` record, then the backend under the call's deadline.

One call is one A2A exchange, from the proxy's own identity:

1. the agent card is read from the declared URL (once, then cached; a card that cannot
   be read is UNAVAILABLE ``A2A_AGENT_UNAVAILABLE``: nothing was sent);
2. one ``SendMessage`` (``return_immediately``) carrying the call's arguments as one
   DataPart, ``message_id`` = the call's effect id (stable across retries), and
   ``metadata`` naming the workflow, task and effect;
3. ``GetTask`` polled (20 ms doubling to 500 ms) until the task is terminal, all within
   the call's deadline; a call that runs out of time asks the agent to cancel the task
   (best effort) and answers DEADLINE_EXCEEDED;
4. a COMPLETED task answers its artifacts' data: the first object DataPart, else the
   text parts as ``{"text": …}``; FAILED, REJECTED, CANCELED and interrupted states
   (input or auth required: the proxy does not converse) are ToolErrors
   (FAILED_PRECONDITION ``A2A_TASK_<STATE>``). An error answer that refuses the message
   (invalid params, unsupported content…) is FAILED_PRECONDITION ``A2A_REQUEST_REFUSED``;
   any other failure once the message may have arrived is UNAVAILABLE
   ``A2A_OUTCOME_UNKNOWN`` (a side-effecting call's claim stays: a retry asks first).

What the exchange was rides on the call's audit records as ``exchange``: the card's
name, the interface URL and binding, the message id, the remote task and context ids and
the final state. Never the bearer token. With ``requires_secret``, the tool secret read
with the caller's token (``tool-secrets/a2a-<name>``) gates the call; its
``bearer_token`` field, if present, is sent as ``Authorization: Bearer …``.

Not done: the gRPC binding (an agent card offering only gRPC is refused at the first
call), mTLS client certificates towards the agent, and a ``lookup``: an A2A agent cannot
be asked whether an interrupted exchange ran, so a side-effecting call whose executor
died waits for a human (EFFECT_OUTCOME_UNKNOWN, services/tool_proxy/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import httpx
import structlog
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    A2AClientTimeoutError,
    Client,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
)
from a2a.types import a2a_pb2
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import (
    A2AError,
    ContentTypeNotSupportedError,
    ExtensionSupportRequiredError,
    InvalidParamsError,
    InvalidRequestError,
    JSONParseError,
    MethodNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from google.protobuf import json_format, struct_pb2

from services.tool_proxy.tools.registry import (
    Backend,
    CallInfo,
    SideEffect,
    Tool,
    ToolError,
    ToolSpec,
)
from tessera.a2a_agents import A2AAgent
from tessera.runtime.errors import Unavailable
from tessera.vault.tokens import ToolSecret

__all__ = ["INPUT_SCHEMA", "A2AAgents"]

log = structlog.get_logger(__name__)

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "input": {"type": "object", "description": "The task's input."},
        "blackboard": {
            "type": "object",
            "description": "The blackboard keys the capability reads.",
        },
    },
    "required": ["input"],
    "additionalProperties": False,
}
"""What the bridge sends: the task's input and the blackboard keys its contract reads."""

_TERMINAL = {
    a2a_pb2.TASK_STATE_COMPLETED,
    a2a_pb2.TASK_STATE_FAILED,
    a2a_pb2.TASK_STATE_CANCELED,
    a2a_pb2.TASK_STATE_REJECTED,
}
_INTERRUPTED = {a2a_pb2.TASK_STATE_INPUT_REQUIRED, a2a_pb2.TASK_STATE_AUTH_REQUIRED}
_POLL_FIRST_S = 0.02
_POLL_MAX_S = 0.5
_CANCEL_WITHIN_S = 2.0
_CARD_WITHIN_S = 5.0
_BINDINGS = [TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON]
_REFUSALS = (
    ContentTypeNotSupportedError,
    ExtensionSupportRequiredError,
    InvalidParamsError,
    InvalidRequestError,
    JSONParseError,
    MethodNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
"""Error answers that say the agent refused the message before acting on it (others,
e.g. an internal error, may come after it began: their outcome is unknown)."""


def _state(task: a2a_pb2.Task) -> str:
    return a2a_pb2.TaskState.Name(task.status.state)


def _data(parts: Any) -> dict[str, Any] | None:
    for part in parts:
        if part.HasField("data") and part.data.HasField("struct_value"):
            return json_format.MessageToDict(part.data.struct_value)
    return None


def _result(task: a2a_pb2.Task) -> dict[str, Any]:
    """A completed task's answer: its first object DataPart (artifacts first, then the
    final status message), else its text parts."""
    for parts in [a.parts for a in task.artifacts] + [task.status.message.parts]:
        data = _data(parts)
        if data is not None:
            return data
    texts = [p.text for a in task.artifacts for p in a.parts if p.HasField("text")]
    return {"text": "\n".join(texts)} if texts else {}


class _Agent:
    """One declared agent: its card and client, made at the first call."""

    def __init__(self, decl: A2AAgent, cancels: set[asyncio.Task[None]]) -> None:
        self.decl = decl
        self._client: Client | None = None
        self._card: a2a_pb2.AgentCard | None = None
        self._http: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._cancels = cancels

    async def client(self, headers: Mapping[str, str]) -> tuple[Client, a2a_pb2.AgentCard]:
        """The agent's client and card; the card is read (with ``headers``: a protected
        card needs the bearer token too) at the first call, then kept."""
        async with self._lock:
            if self._client is None or self._card is None:
                http = self._http = self._http or httpx.AsyncClient(
                    timeout=httpx.Timeout(self.decl.timeout_s + 1.0, connect=_CARD_WITHIN_S)
                )
                base, path = _card_location(self.decl.url)
                try:
                    async with asyncio.timeout(_CARD_WITHIN_S):
                        card = await A2ACardResolver(http, base).get_agent_card(
                            relative_card_path=path, http_kwargs={"headers": dict(headers)}
                        )
                    factory = ClientFactory(
                        ClientConfig(
                            streaming=False,
                            httpx_client=http,
                            supported_protocol_bindings=list(_BINDINGS),
                            accepted_output_modes=["application/json", "text/plain"],
                        )
                    )
                    self._client = factory.create(card)
                except (A2AError, httpx.HTTPError, TimeoutError, ValueError) as exc:
                    log.warning(
                        "a2a_agent_unavailable", agent=self.decl.name, error=type(exc).__name__
                    )
                    raise ToolError(
                        f"A2A agent {self.decl.name!r}: its agent card cannot be used",
                        reason="A2A_AGENT_UNAVAILABLE",
                        retry_after_s=1.0,
                    ) from None
                self._card = card
            return self._client, self._card

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._http is not None:
            await self._http.aclose()
        self._client = self._card = self._http = None

    async def exchange(
        self, arguments: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        decl = self.decl
        headers: dict[str, str] = {}
        if secret is not None and secret.data.get("bearer_token"):
            headers["Authorization"] = f"Bearer {secret.data['bearer_token']}"
        client, card = await self.client(headers)
        interface = next(
            (i for i in card.supported_interfaces if i.protocol_binding in _BINDINGS), None
        )
        record = call.exchange
        record.update(
            agent_card=card.name,
            card_url=decl.url,
            interface=interface.url if interface else "",
            binding=interface.protocol_binding if interface else "",
            message_id=call.effect_id,
        )
        ctx = ClientCallContext(service_parameters=headers or None)
        data = struct_pb2.Value()
        data.struct_value.update(dict(arguments))
        request = a2a_pb2.SendMessageRequest(
            message=a2a_pb2.Message(
                message_id=call.effect_id,
                role=a2a_pb2.ROLE_USER,
                parts=[a2a_pb2.Part(data=data, media_type="application/json")],
            ),
            configuration=a2a_pb2.SendMessageConfiguration(
                return_immediately=True,
                accepted_output_modes=["application/json", "text/plain"],
            ),
        )
        request.message.metadata.update(
            {
                "tessera/workflow_id": call.workflow_id,
                "tessera/task_id": call.task_id,
                "tessera/effect_id": call.effect_id,
            }
        )
        task: a2a_pb2.Task | None = None
        try:
            async for event in client.send_message(request, context=ctx):
                if event.HasField("message"):  # answered at once, no task
                    record.update(state="MESSAGE")
                    return _data(event.message.parts) or {}
                if event.HasField("task"):
                    task = event.task
                    break
            if task is None:
                raise ToolError(
                    f"A2A agent {decl.name!r} answered neither a task nor a message",
                    reason="A2A_BAD_RESPONSE",
                )
            record.update(task_id=task.id, context_id=task.context_id, state=_state(task))
            delay = _POLL_FIRST_S
            while task.status.state not in _TERMINAL | _INTERRUPTED:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
                task = await client.get_task(a2a_pb2.GetTaskRequest(id=task.id), context=ctx)
                record.update(state=_state(task))
        except asyncio.CancelledError:
            if task is not None and task.status.state not in _TERMINAL:
                self._cancel_later(client, task.id, ctx)
            raise
        except A2AClientTimeoutError:
            raise _unknown(decl.name, "timed out") from None
        except A2AClientError as exc:
            if task is None and isinstance(exc.__cause__, httpx.ConnectError):
                raise ToolError(
                    f"A2A agent {decl.name!r} is unreachable",
                    reason="A2A_AGENT_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from None
            raise _unknown(decl.name, "failed in transit") from None
        except A2AError as exc:  # an error answer of the agent's
            if task is not None or not isinstance(exc, _REFUSALS):
                raise _unknown(decl.name, "ended in an error") from None
            raise ToolError(
                f"A2A agent {decl.name!r} refused the message ({type(exc).__name__})",
                reason="A2A_REQUEST_REFUSED",
            ) from None
        if task.status.state != a2a_pb2.TASK_STATE_COMPLETED:
            state = _state(task).removeprefix("TASK_STATE_")
            raise ToolError(
                f"A2A agent {decl.name!r} ended its task {state.lower()}",
                reason=f"A2A_TASK_{state}",
            )
        return _result(task)

    def _cancel_later(self, client: Client, task_id: str, ctx: ClientCallContext) -> None:
        """Ask the agent to cancel a task the call gave up on (best effort, bounded)."""

        async def cancel() -> None:
            try:
                async with asyncio.timeout(_CANCEL_WITHIN_S):
                    await client.cancel_task(a2a_pb2.CancelTaskRequest(id=task_id), context=ctx)
            except (A2AError, TimeoutError, httpx.HTTPError) as exc:
                log.info("a2a_cancel_failed", agent=self.decl.name, error=type(exc).__name__)

        job = asyncio.ensure_future(cancel())
        self._cancels.add(job)
        job.add_done_callback(self._cancels.discard)


def _card_location(url: str) -> tuple[str, str | None]:
    """(base URL, card path): the well-known path unless ``url`` names the card itself."""
    if url.endswith(".json"):
        base, _, name = url.rpartition("/")
        return base, name
    return url, None


def _unknown(agent: str, what: str) -> Unavailable:
    """The message may have reached the agent: outcome unknown (transient for the caller;
    a side-effecting call's claim stays, so a retry asks before running again)."""
    return Unavailable(
        f"the exchange with A2A agent {agent!r} {what}; its outcome is unknown",
        reason="A2A_OUTCOME_UNKNOWN",
        retry_after_s=1.0,
        metadata={"tool": f"a2a.{agent}"},
    )


class A2AAgents:
    """Every declared A2A agent, as tools (clients are made at each agent's first call)."""

    def __init__(self, declarations: tuple[A2AAgent, ...]) -> None:
        self._cancels: set[asyncio.Task[None]] = set()
        self._agents = [_Agent(d, self._cancels) for d in declarations]

    def tools(self) -> list[Tool]:
        return [self._tool(agent) for agent in self._agents]

    async def stop(self) -> None:
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)
        for agent in self._agents:
            await agent.close()

    @staticmethod
    def _tool(agent: _Agent) -> Tool:
        decl = agent.decl
        spec = ToolSpec(
            name=decl.tool,
            description=(
                decl.capability.description or f"The A2A agent {decl.name!r} at {decl.url}"
            )[:2000],
            input_schema=INPUT_SCHEMA,
            side_effect=SideEffect(decl.side_effect),
            category=decl.category,
            requires_secret=decl.requires_secret,
            backend=Backend.A2A,
            timeout_s=decl.timeout_s,
        )
        return Tool(spec, agent.exchange)
