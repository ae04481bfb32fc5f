"""The :class:`Agent`: capability declarations, task execution, serving and registration."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
import structlog
from opentelemetry import trace

from tessera.agent._contract import (
    ApprovalName,
    Capability,
    CostClassName,
    Handler,
    SideEffectName,
    build_contract,
)
from tessera.agent._convert import (
    STRUCT_TYPE,
    from_struct,
    from_value,
    payload_to_dict,
    to_payload,
    to_struct,
    to_value,
    typed_name,
)
from tessera.agent._dedup import Deduplicator
from tessera.agent._registration import Registration
from tessera.agent._settings import AgentSettings
from tessera.agent._types import TaskContext, TaskResult
from tessera.runtime import grpc_server
from tessera.runtime.config import ServiceSettings
from tessera.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TesseraError,
    from_rpc_error,
    to_status,
)
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.logging import configure_logging
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.runtime.telemetry import configure_tracing, extract_context
from tessera.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    tool_proxy_pb2,
    tool_proxy_pb2_grpc,
)

__all__ = ["AGENT_SERVICE_NAME", "TASK_TOKEN_METADATA", "Agent"]

DEREGISTER_LINGER_S = 1.0
"""How long a stopping replica keeps serving after leaving the registry: longer than the
coordinator's registry snapshot may be stale (0.5 s)."""

log = structlog.get_logger(__name__)
_tracer = trace.get_tracer(__name__)

AGENT_SERVICE_NAME: str = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

DedupKey = tuple[str, str, int]
TASK_SPAN = "tessera.v1.AgentService/ExecuteTasks task"
"""The span of one attempt taken over a stream (a unary call has its RPC's span)."""


class _Servicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.DescribeResponse:
        return agent_pb2.DescribeResponse(agent=self._agent.descriptor())

    async def ExecuteTask(
        self, request: agent_pb2.ExecuteTaskRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ExecuteTaskResponse:
        return await self._agent.execute(request)

    async def ExecuteTasks(
        self,
        requests: AsyncIterator[agent_pb2.ExecuteTasksRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.ExecuteTasksResponse]:
        """Attempts run concurrently as they arrive; each answer is sent as it is ready.
        The stream ends once the caller closed its side and every attempt answered; if
        the caller goes away, running attempts go on (their results are cached for the
        retry, as with ExecuteTask)."""
        answers: asyncio.Queue[agent_pb2.ExecuteTasksResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()  # holds the tasks until they end
        outstanding = 0  # received and not yet answered

        async def answer(request: agent_pb2.ExecuteTasksRequest) -> None:
            answers.put_nowait(await self._agent.answer(request))

        async def read() -> None:
            nonlocal outstanding
            async for request in requests:
                outstanding += 1
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            answers.put_nowait(None)  # the caller closed its side

        reader = asyncio.create_task(read())
        closed = False
        try:
            while not (closed and outstanding == 0):
                item = await answers.get()
                if item is None:
                    closed = True
                    continue
                outstanding -= 1
                yield item
        finally:
            reader.cancel()


class Agent:
    """A domain agent: declare capabilities with :meth:`capability`, then :meth:`run` it
    (a process) or :meth:`start`/:meth:`stop` it (in-process, e.g. tests).

    Execution guarantees: one execution per ``(workflow_id, task_id, attempt)`` while it is
    remembered (concurrent duplicates join the running one, later ones get the cached
    response); at most ``max_concurrency`` executions per capability (more are refused
    with RESOURCE_EXHAUSTED); each runs under its capability ``timeout_s``.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str = "0.0.0",
        dedup_entries: int = 10_000,
    ) -> None:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"agent name {name!r}: use letters, digits, '-' and '_' only")
        self.name = name
        self.version = version
        self._capabilities: dict[str, Capability] = {}
        self._active: dict[str, int] = {}
        self._dedup: Deduplicator[agent_pb2.ExecuteTaskResponse] = Deduplicator(dedup_entries)
        self.instance_id: str = uuid.uuid4().hex[:12]
        self.endpoint: str = ""
        self._server: GrpcServer | None = None
        self._workload: Workload | None = None
        self._registration: Registration | None = None
        self._registry_channel: grpc.aio.Channel | None = None
        self._tool_channels: dict[str, grpc.aio.Channel] = {}

    # -- declaration ----------------------------------------------------------------------

    def capability(
        self,
        name: str,
        *,
        version: str,
        side_effect: SideEffectName,
        description: str = "",
        reads: Sequence[str] = (),
        writes: Sequence[str] = (),
        tools: Sequence[str] = (),
        handoffs: Sequence[str] = (),
        compensation: str = "",
        timeout_s: float = 30.0,
        max_concurrency: int = 0,
        confidence_threshold: float = 0.0,
        approval: ApprovalName = "none",
        cost_class: CostClassName = "free",
        input_type: str = STRUCT_TYPE,
        output_type: str = STRUCT_TYPE,
        output_schema: Mapping[str, Any] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Declare a capability; decorates ``async def handler(ctx) -> TaskResult`` and
        returns it unchanged (so tests can call it directly). ``description`` defaults to
        the handler's docstring. ``compensation`` names the capability that undoes this
        one's effects when its workflow fails or is cancelled (see
        CapabilityContract.compensation). Raises ``ValueError`` on an invalid
        declaration."""

        def register(handler: Handler) -> Handler:
            if name in self._capabilities:
                raise ValueError(f"agent {self.name!r} already offers {name!r}")
            doc = (handler.__doc__ or "").strip()
            contract = build_contract(
                name,
                version=version,
                side_effect=side_effect,
                description=description or doc,
                reads=reads,
                writes=writes,
                tools=tools,
                handoffs=handoffs,
                compensation=compensation,
                timeout_s=timeout_s,
                max_concurrency=max_concurrency,
                confidence_threshold=confidence_threshold,
                approval=approval,
                cost_class=cost_class,
                input_type=input_type,
                output_type=output_type,
                output_schema=output_schema,
            )
            self._capabilities[name] = Capability(contract, handler)
            self._active[name] = 0
            return handler

        return register

    @property
    def capabilities(self) -> Mapping[str, Capability]:
        return dict(self._capabilities)

    def descriptor(self) -> agent_pb2.AgentDescriptor:
        """This replica as the registry and Describe show it."""
        return agent_pb2.AgentDescriptor(
            name=self.name,
            version=self.version,
            instance_id=self.instance_id,
            endpoint=self.endpoint,
            capabilities=[c.contract for c in self._capabilities.values()],
        )

    # -- execution ------------------------------------------------------------------------

    def _validate(self, request: agent_pb2.ExecuteTaskRequest) -> Capability:
        violations: list[tuple[str, str]] = []
        if not request.context.workflow_id:
            violations.append(("context.workflow_id", "required"))
        if not request.context.task_id:
            violations.append(("context.task_id", "required"))
        if not request.capability:
            violations.append(("capability", "required"))
        if request.attempt < 1:
            violations.append(("attempt", f"must be >= 1, got {request.attempt}"))
        if violations:
            raise InvalidArgument(
                "invalid ExecuteTaskRequest: " + ", ".join(f for f, _ in violations),
                field_violations=violations,
            )
        cap = self._capabilities.get(request.capability)
        if cap is None:
            raise NotFound(
                f"agent {self.name!r} does not offer capability {request.capability!r}",
                reason="CAPABILITY_NOT_FOUND",
                metadata={"agent": self.name, "capability": request.capability},
            )
        got = typed_name(request.input)
        if got != STRUCT_TYPE and got != cap.contract.input_type:
            raise InvalidArgument(
                f"input type {got!r} does not match the contract's {cap.contract.input_type!r}",
                field_violations=[("input", f"expected {cap.contract.input_type}")],
            )
        return cap

    async def answer(
        self, request: agent_pb2.ExecuteTasksRequest
    ) -> agent_pb2.ExecuteTasksResponse:
        """One attempt sent over an ExecuteTasks stream: its response, or the status
        ExecuteTask would have failed with. Bounded by the request's ``timeout``."""
        out = agent_pb2.ExecuteTasksResponse(call_id=request.call_id)
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else None
        try:
            with _tracer.start_as_current_span(
                TASK_SPAN,
                context=extract_context(request.trace_context),
                kind=trace.SpanKind.SERVER,
            ):
                async with asyncio.timeout(timeout):
                    out.response.CopyFrom(await self.execute(request.task))
        except TimeoutError:
            out.error.CopyFrom(
                to_status(DeadlineExceeded(f"no answer within {timeout:g}s", reason="DEADLINE"))
            )
        except TesseraError as exc:
            out.error.CopyFrom(to_status(exc))
        except Exception as exc:
            ref = uuid.uuid4().hex
            log.error("task_stream_answer_failed", ref=ref, exc_info=exc)
            out.error.CopyFrom(to_status(Internal(f"task failed (ref {ref})", reason="INTERNAL")))
        return out

    async def execute(self, request: agent_pb2.ExecuteTaskRequest) -> agent_pb2.ExecuteTaskResponse:
        """Run one task attempt (what ExecuteTask serves). Raises :class:`TesseraError`
        subclasses for every failure a caller can act on."""
        cap = self._validate(request)
        key: DedupKey = (request.context.workflow_id, request.context.task_id, request.attempt)
        hit, cached = self._dedup.cached(key)
        if hit and cached is not None:
            log.info(
                "task_replayed",
                capability=cap.name,
                workflow_id=key[0],
                task_id=key[1],
                attempt=key[2],
            )
            return cached
        task = self._dedup.running(key)
        if task is None:
            limit = cap.contract.max_concurrency
            if self._active[cap.name] >= limit:
                raise ResourceExhausted(
                    f"capability {cap.name!r} is at its concurrency limit of {limit}",
                    reason="CAPABILITY_BUSY",
                    retry_after_s=0.1,
                    metadata={"capability": cap.name, "max_concurrency": str(limit)},
                )
            self._active[cap.name] += 1
            task = self._dedup.start(key, lambda: self._run(cap, request))
        # The execution outlives a caller that goes away; its result is cached for the retry.
        return await asyncio.shield(task)

    async def _run(
        self, cap: Capability, request: agent_pb2.ExecuteTaskRequest
    ) -> agent_pb2.ExecuteTaskResponse:
        ctx = self._context(cap, request)
        try:
            with structlog.contextvars.bound_contextvars(
                workflow_id=ctx.workflow_id, task_id=ctx.task_id, attempt=ctx.attempt
            ):
                try:
                    response = await self._invoke(cap, ctx)
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    self._log_executed(cap, request, ok=False)
                    raise
                self._log_executed(cap, request, ok=True)
                return response
        finally:
            self._active[cap.name] -= 1

    async def _invoke(self, cap: Capability, ctx: TaskContext) -> agent_pb2.ExecuteTaskResponse:
        try:
            ctx.deadline = time.monotonic() + cap.timeout_s
            async with asyncio.timeout(cap.timeout_s):
                result = await cap.handler(ctx)
        except TimeoutError:
            raise DeadlineExceeded(
                f"capability {cap.name!r} exceeded its timeout of {cap.timeout_s:g}s",
                reason="CAPABILITY_TIMEOUT",
                metadata={"capability": cap.name, "timeout_s": f"{cap.timeout_s:g}"},
            ) from None
        except TesseraError:
            raise
        except grpc.aio.AioRpcError as exc:
            # A tool-proxy refusal the handler did not handle (approval required, policy
            # deny...): the coordinator acts on its reason, so keep the details.
            raise from_rpc_error(exc) from None
        except Exception as exc:
            ref = uuid.uuid4().hex
            ctx.log.error("task_handler_failed", ref=ref, exc_info=exc)
            raise Internal(
                f"capability {cap.name!r} failed (ref {ref})",
                reason="HANDLER_FAILED",
                metadata={"capability": cap.name, "ref": ref},
            ) from exc
        if not isinstance(result, TaskResult):
            raise Internal(
                f"capability {cap.name!r} returned {type(result).__name__}, not TaskResult",
                reason="HANDLER_FAILED",
                metadata={"capability": cap.name},
            )
        return self._response(cap, ctx, result)

    def _context(self, cap: Capability, request: agent_pb2.ExecuteTaskRequest) -> TaskContext:
        reads = set(cap.contract.reads)
        return TaskContext(
            capability=cap.name,
            workflow_id=request.context.workflow_id,
            task_id=request.context.task_id,
            attempt=request.attempt,
            input=payload_to_dict(request.input),
            blackboard={k: from_value(v) for k, v in request.blackboard.items() if k in reads},
            blackboard_version=request.blackboard_version,
            remaining_budget=request.remaining_budget,
            causation_id=request.context.causation_id,
            traceparent=request.context.traceparent,
            payload=request.input,
            tool_proxy_endpoint=request.tool_proxy_endpoint,
            task_token=request.task_token,
            log=structlog.get_logger("tessera.agent").bind(
                agent=self.name,
                capability=cap.name,
                workflow_id=request.context.workflow_id,
                task_id=request.context.task_id,
                attempt=request.attempt,
            ),
            _tool_caller=self._call_tool,
        )

    def _response(
        self, cap: Capability, ctx: TaskContext, result: TaskResult
    ) -> agent_pb2.ExecuteTaskResponse:
        contract = cap.contract
        undeclared = sorted(set(result.writes) - set(contract.writes))
        if undeclared:
            # The coordinator refuses these (and records why); we only make it visible here.
            ctx.log.warning("undeclared_blackboard_writes", keys=undeclared)
        if result.handoff is not None and result.handoff.capability not in contract.handoffs:
            ctx.log.warning("undeclared_handoff", target=result.handoff.capability)
        response = agent_pb2.ExecuteTaskResponse(
            instance_id=self.instance_id,
            summary=result.summary,
            usage=common_pb2.Usage(
                tokens=result.usage.tokens,
                cost_micros=result.usage.cost_micros,
                tool_calls=result.usage.tool_calls or ctx.tool_calls,
            ),
        )
        payload = to_payload(result.output)
        if payload is not None:
            response.output.CopyFrom(payload)
        try:
            for key, value in result.writes.items():
                response.blackboard_writes[key].CopyFrom(to_value(value))
        except (TypeError, ValueError) as exc:
            raise Internal(
                f"capability {cap.name!r} wrote a value that is not JSON",
                reason="HANDLER_FAILED",
                metadata={"capability": cap.name},
            ) from exc
        if result.confidence is not None:
            response.confidence = result.confidence
            response.has_confidence = True
        if result.handoff is not None:
            response.handoff.capability = result.handoff.capability
            response.handoff.reason = result.handoff.reason
            if result.handoff.input is not None:
                response.handoff.input.json.CopyFrom(to_struct(result.handoff.input))
        if result.approval_request:
            response.approval_request.reason = result.approval_request
        return response

    def _log_executed(
        self, cap: Capability, request: agent_pb2.ExecuteTaskRequest, *, ok: bool
    ) -> None:
        # The coordinator records the outcome it received (TaskSucceeded/TaskFailed carry
        # the replica); this line is the replica's own account, for its operators.
        log.info(
            "task_executed",
            agent=self.name,
            instance_id=self.instance_id,
            capability=cap.name,
            workflow_id=request.context.workflow_id,
            task_id=request.context.task_id,
            attempt=request.attempt,
            outcome="ok" if ok else "error",
        )

    # -- tools ----------------------------------------------------------------------------

    async def _call_tool(
        self, ctx: TaskContext, tool: str, arguments: Mapping[str, Any], key: str
    ) -> dict[str, Any]:
        endpoint = ctx.tool_proxy_endpoint
        if not endpoint:
            raise FailedPrecondition(
                f"tool {tool!r}: the task carries no tool proxy endpoint",
                reason="NO_TOOL_PROXY",
            )
        ch = self._tool_channels.get(endpoint)
        if ch is None:
            workload = self._workload
            assert workload is not None, "tools are called only while the agent runs"
            ch = self._tool_channels[endpoint] = workload.channel(
                endpoint,
                peer=workload.peer("service", "tool-proxy"),
                service=f"agent-{self.name}",
            )
        stub = tool_proxy_pb2_grpc.ToolProxyServiceStub(ch)
        request = tool_proxy_pb2.InvokeToolRequest(
            context=common_pb2.RequestContext(
                workflow_id=ctx.workflow_id,
                task_id=ctx.task_id,
                causation_id=ctx.causation_id,
                traceparent=ctx.traceparent,
                principal=self.name,
            ),
            tool=tool,
            arguments=to_struct(arguments),
            idempotency_key=key,
        )
        ctx.log.info("tool_call", tool=tool)
        # Within what is left of the capability's timeout (the handler is cancelled then),
        # else the channel's default deadline.
        timeout = None if ctx.deadline is None else max(0.05, ctx.deadline - time.monotonic())
        response = await stub.InvokeTool(
            request, metadata=((TASK_TOKEN_METADATA, ctx.task_token),), timeout=timeout
        )
        return from_struct(response.result)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, *, settings: ServiceSettings) -> str:
        """Serve AgentService on ``settings.listen`` and register with the registry
        service at ``settings.registry_address`` (heartbeat until :meth:`stop`); returns
        the registered endpoint. The agent opens no NATS connection."""
        if self._server is not None:
            raise RuntimeError(f"agent {self.name!r} already started")
        if not self._capabilities:
            raise RuntimeError(f"agent {self.name!r} declares no capability")
        try:
            within_s = settings.startup_timeout_s
            self._workload = await Workload.start(settings, what=f"agent {self.name!r}")
            servicer = _Servicer(self)
            self._server = GrpcServer(
                name=f"agent-{self.name}",
                settings=settings,
                register=[lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, s)],
                service_names=[AGENT_SERVICE_NAME],
                identity=self._workload.certificate,
            )
            # SERVING only once registered: "up" means the planner can route to it (a plan
            # checked against a registry the agent is not in yet is refused as invalid).
            await self._server.start(serving=False)
            advertise = settings.advertise if isinstance(settings, AgentSettings) else ""
            self.endpoint = advertise or self._server.address
            interval = (
                settings.heartbeat_interval_s if isinstance(settings, AgentSettings) else None
            )
            self._registry_channel = self._workload.channel(
                settings.registry_address,
                peer=self._workload.peer("service", "registry"),
                service=f"agent-{self.name}",
            )
            self._registration = Registration(
                self._registry_channel,
                self.descriptor(),
                interval_s=interval,
                register_within_s=within_s,
            )
            await self._registration.start()
            await self._server.mark_serving()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "agent_started",
            agent=self.name,
            instance_id=self.instance_id,
            endpoint=self.endpoint,
            capabilities=sorted(self._capabilities),
        )
        return self.endpoint

    async def stop(self, grace_s: float | None = None, *, linger_s: float = 0.0) -> None:
        """Deregister first (no new work is routed here), let running calls finish for
        ``grace_s`` (default ``settings.shutdown_grace_s``), then release everything.
        Idempotent."""
        if self._registration is not None:
            await self._registration.stop()
            self._registration = None
            if linger_s > 0:
                # Callers may still hold a registry snapshot naming this replica for a
                # moment: keep answering them instead of refusing connections.
                await asyncio.sleep(linger_s)
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        await self._dedup.cancel_all()
        for ch in self._tool_channels.values():
            await ch.close()
        self._tool_channels.clear()
        if self._registry_channel is not None:
            await self._registry_channel.close()
            self._registry_channel = None
        if self._workload is not None:
            await self._workload.close()
            self._workload = None
        self.endpoint = ""

    async def serve(self, settings: ServiceSettings) -> None:
        """Start, run until SIGTERM/SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start(settings=settings)
            await stop.wait()
            log.info("agent_stopping", agent=self.name, instance_id=self.instance_id)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop(linger_s=DEREGISTER_LINGER_S)

    def run(self) -> None:
        """Entry point of ``python -m services.agents.<name>``: settings from the
        environment (see :class:`AgentSettings`), JSON logs, tracing, uvloop."""
        settings = AgentSettings.for_agent(self.name)
        configure_logging(f"agent-{self.name}", settings.log_level)
        configure_tracing(f"agent-{self.name}", settings.otel_exporter, settings.otel_endpoint)
        grpc_server.run(lambda: self.serve(settings))
