"""The planner as one object with ``start()``/``stop()`` (alone under
``python -m services.planner`` or in-process for tests), its gRPC servicer, and the
planning logic between them."""

from __future__ import annotations

import grpc
import structlog
from google.protobuf import struct_pb2
from nats.aio.client import Client

from services.planner.backends import OpenAICompatibleBackend, PlanningBackend, TemplateBackend
from services.planner.intent import classify
from services.planner.settings import PlannerSettings
from services.planner.templates import TemplateCatalog, check_inputs, load_templates, merge_budget
from services.planner.validation import ContractSource, Limits, PlanValidator
from tessera.registry import Registry
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import InvalidArgument, ResourceExhausted
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.v1 import common_pb2, planner_pb2, planner_pb2_grpc

__all__ = ["SERVICE_NAME", "Planner", "PlannerService", "PlannerServicer"]

log = structlog.get_logger(__name__)

SERVICE_NAME: str = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name
MAX_GOAL_CHARS = 4096


class Planner:
    """Goal → validated task graph. No gRPC here: errors are :class:`TesseraError`."""

    def __init__(
        self,
        *,
        templates: TemplateCatalog,
        registry: ContractSource,
        limits: Limits | None = None,
        min_confidence: float = 0.35,
        max_input_bytes: int = 256 * 1024,
        llm: PlanningBackend | None = None,
    ) -> None:
        self.templates = templates
        self.validator = PlanValidator(registry, limits or Limits())
        self.template_backend = TemplateBackend(min_confidence=min_confidence)
        self.max_input_bytes = max_input_bytes
        self.llm = llm

    def _check_request(self, goal: str, inputs: struct_pb2.Struct) -> None:
        if len(goal) > MAX_GOAL_CHARS:
            raise InvalidArgument(
                f"goal is longer than {MAX_GOAL_CHARS} characters",
                reason="GOAL_TOO_LONG",
                field_violations=[("goal", f"at most {MAX_GOAL_CHARS} characters")],
            )
        size = inputs.ByteSize()
        if size > self.max_input_bytes:
            raise ResourceExhausted(
                f"inputs are {size} bytes serialized; the limit is {self.max_input_bytes}",
                reason="INPUTS_TOO_LARGE",
                metadata={"input_bytes": str(size), "max_input_bytes": str(self.max_input_bytes)},
            )

    async def plan(
        self,
        goal: str,
        inputs: struct_pb2.Struct,
        budget: common_pb2.Budget | None = None,
    ) -> planner_pb2.PlanResponse:
        """Pick a template (or ask the LLM backend), check inputs, build and validate."""
        self._check_request(goal, inputs)
        goal = goal.strip()
        if self.llm is not None and goal not in self.templates:
            response = await self._plan_with_llm(goal, inputs, budget)
            if response is not None:
                return response
        template, intents = self.template_backend.select(goal, self.templates)
        check_inputs(template, inputs)
        result = await self.validator.validate(template.build(inputs, budget))
        log.info(
            "plan_created",
            template=template.name,
            confidence=intents[0].confidence,
            tasks=len(result.plan.tasks),
        )
        return planner_pb2.PlanResponse(plan=result.plan, intents=[m.to_proto() for m in intents])

    async def _plan_with_llm(
        self, goal: str, inputs: struct_pb2.Struct, budget: common_pb2.Budget | None
    ) -> planner_pb2.PlanResponse | None:
        assert self.llm is not None
        graph = await self.llm.plan(goal, inputs, self.templates)
        if graph is None:
            return None
        template = self.templates.get(graph.template)
        if template is not None:
            check_inputs(template, inputs)
            defaults = graph.budget if graph.HasField("budget") else template.budget_proto()
            if not graph.max_iterations:
                graph.max_iterations = template.max_iterations
        else:
            defaults = graph.budget
        graph.budget.CopyFrom(merge_budget(defaults, budget))
        graph.blackboard.CopyFrom(inputs)
        try:
            result = await self.validator.validate(graph)
        except InvalidArgument as exc:
            log.warning(
                "llm_plan_invalid", violations=[f"{f}: {d}" for f, d in exc.field_violations]
            )
            return None
        intents = classify(goal, self.templates.values())
        log.info("plan_created", template=graph.template, backend="llm", tasks=len(graph.tasks))
        return planner_pb2.PlanResponse(plan=result.plan, intents=[m.to_proto() for m in intents])

    async def validate(self, graph: planner_pb2.TaskGraph) -> planner_pb2.TaskGraph:
        """The plan with defaults filled in, or INVALID_ARGUMENT (PLAN_INVALID)."""
        return (await self.validator.validate(graph)).plan


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    """``tessera.v1.PlannerService`` over :class:`Planner`."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner

    async def Plan(
        self, request: planner_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.PlanResponse:
        return await self.planner.plan(
            request.goal, request.inputs, request.budget if request.HasField("budget") else None
        )

    async def ValidatePlan(
        self, request: planner_pb2.ValidatePlanRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.ValidatePlanResponse:
        if not request.HasField("plan"):
            raise InvalidArgument(
                "plan is required", reason="PLAN_REQUIRED", field_violations=[("plan", "required")]
            )
        return planner_pb2.ValidatePlanResponse(plan=await self.planner.validate(request.plan))

    async def ListTemplates(
        self, request: planner_pb2.ListTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.ListTemplatesResponse:
        return planner_pb2.ListTemplatesResponse(
            templates=[t.summary() for t in self.planner.templates.values()]
        )


class PlannerService:
    """The deployable: loads templates (a broken one fails ``start()``), connects NATS for
    the registry and serves ``tessera.v1.PlannerService`` with health and reflection."""

    def __init__(self, settings: PlannerSettings, *, llm: PlanningBackend | None = None) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self._llm = llm
        self._nc: Client | None = None
        self.server: GrpcServer | None = None
        self.planner: Planner | None = None
        self.workload: Workload | None = None

    @property
    def address(self) -> str:
        """``host:port`` clients dial; only after ``start()``."""
        if self.server is None:
            raise RuntimeError("planner not started")
        return self.server.address

    def _llm_backend(self) -> PlanningBackend | None:
        if self._llm is not None:
            return self._llm
        s = self.settings
        if not s.llm_url:
            return None
        key = s.llm_api_key.get_secret_value() if s.llm_api_key is not None else None
        return OpenAICompatibleBackend(
            s.llm_url, s.llm_model, api_key=key, timeout_s=s.llm_timeout_s
        )

    async def start(self) -> str:
        """Load templates, connect, serve; returns the address. Raises
        :class:`~services.planner.templates.TemplateError` for a broken template."""
        s = self.settings
        templates = load_templates(s.template_dirs)
        try:
            self.workload = await Workload.start(s)
            self._nc = await connect(
                s.nats_url,
                name="planner",
                initial_timeout_s=s.startup_timeout_s,
                **self.workload.nats_options(s),
            )
            js = self._nc.jetstream()
            await declare(
                js,
                self.topology,
                replicas=s.jetstream_replicas,
                within_s=s.startup_timeout_s,
                leaders_of=streams_used("planner", self.topology),
            )
            self.planner = Planner(
                templates=templates,
                registry=Registry(js, self.topology),
                limits=Limits(
                    max_depth=s.max_depth,
                    max_fan_out=s.max_fan_out,
                    max_tasks=s.max_tasks,
                    default_max_attempts=s.default_max_attempts,
                    default_timeout_s=s.default_timeout_s,
                ),
                min_confidence=s.min_confidence,
                max_input_bytes=s.max_input_bytes,
                llm=self._llm_backend(),
            )
            servicer = PlannerServicer(self.planner)
            self.server = GrpcServer(
                name="planner",
                settings=s,
                register=[
                    lambda server: planner_pb2_grpc.add_PlannerServiceServicer_to_server(
                        servicer, server
                    )
                ],
                service_names=[SERVICE_NAME],
                identity=self.workload.certificate,
            )
            await self.server.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "planner_started",
            address=self.server.address,
            templates=templates.names(),
            llm=bool(s.llm_url or self._llm),
        )
        return self.server.address

    async def stop(self) -> None:
        """Stop serving (letting calls finish), then close NATS. Idempotent."""
        server, self.server = self.server, None
        if server is not None and server.started:
            await server.stop()
        workload, self.workload = self.workload, None
        if workload is not None:
            await workload.close()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # closing anyway; nothing left to protect
                log.warning("nats_drain_failed", error=repr(exc))
