"""The coordinator as one object with start()/stop(): alone under `python -m
services.coordinator`, or several in one process for tests."""

from __future__ import annotations

import uuid

import grpc
import structlog
from a2a.types import a2a_pb2_grpc
from nats.aio.client import Client
from prometheus_client import start_http_server

from services.coordinator.a2a.cards import AgentCards
from services.coordinator.a2a.service import (
    A2A_SERVICE_NAME,
    CARD_SERVICE_NAME,
    A2AServicer,
    AgentCardServicer,
)
from services.coordinator.admission import Admission
from services.coordinator.audit import WorkflowAuditor
from services.coordinator.budget import BudgetMirror, TaskBudgets
from services.coordinator.dispatcher import Dispatcher
from services.coordinator.plans import PlanCache
from services.coordinator.retention import Retention
from services.coordinator.runner import DURABLE, Runner
from services.coordinator.service import CoordinatorServicer
from services.coordinator.settings import CoordinatorSettings, load_agent_tiers
from services.coordinator.store import STARTS_DURABLE, WorkflowStore
from services.coordinator.timers import Timers
from services.coordinator.tokens import MAX_USES, TaskTokens
from services.coordinator.tool_approvals import ToolApprovals
from tessera.audit import AuditWriter
from tessera.frozen import FrozenAgents
from tessera.policy.control_plane import ControlPlaneAuthorization
from tessera.policy.distribution import DistributedPolicySet, PolicySource
from tessera.policy.store import PolicyStore
from tessera.registry import Registry
from tessera.runtime.bus import Topology, close, connect, declare
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.runtime.startup import until_ready
from tessera.v1 import (
    agent_cards_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    planner_pb2_grpc,
    tool_proxy_pb2_grpc,
)
from tessera.vault.audit_keys import TransitSigner
from tessera.vault.card_keys import CardKeys
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultUnavailable

log = structlog.get_logger(__name__)
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


class Coordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self._nc: Client | None = None
        self._planner_channel: grpc.aio.Channel | None = None
        self._tool_proxy_channel: grpc.aio.Channel | None = None
        self.server: GrpcServer | None = None
        self.runner: Runner | None = None
        self.timers: Timers | None = None
        self.retention: Retention | None = None
        self.frozen: FrozenAgents | None = None
        self.dispatcher: Dispatcher | None = None
        self.tokens: TaskTokens | None = None
        self.auditor: WorkflowAuditor | None = None
        self.workload: Workload | None = None
        self.policy_store: PolicyStore | None = None
        self.distributed: DistributedPolicySet | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    async def start(self) -> str:
        within_s = self.settings.startup_timeout_s
        # Identity first: NATS maps this workload's certificate to its permissions.
        vault = None
        approle_file = self.settings.vault_approle_file
        if approle_file is not None:
            vault = await until_ready(
                lambda: VaultClient.from_approle_file(self.settings.vault_addr, approle_file),
                what="vault login",
                within_s=within_s,
                retry_if=lambda exc: isinstance(exc, VaultUnavailable),
            )
        self.workload = await Workload.start(self.settings, vault=vault)
        self._nc = await connect(
            self.settings.nats_url,
            name="coordinator",
            initial_timeout_s=within_s,
            **self.workload.nats_options(self.settings),
        )
        js = self._nc.jetstream()
        await declare(
            js,
            self.topology,
            replicas=self.settings.jetstream_replicas,
            within_s=within_s,
            leaders_of=streams_used("coordinator", self.topology),
        )
        replica = self.settings.replica_id or uuid.uuid4().hex[:8]
        self.auditor = WorkflowAuditor(
            AuditWriter(js, self.topology, writer=f"coordinator-{replica}", actor="coordinator")
        )
        await self.auditor.start()
        store = WorkflowStore(
            js,
            self.topology,
            nc=self._nc,
            on_published=self.auditor.events,
            replicated=self.settings.jetstream_replicas > 1,
        )
        await store.open()
        if vault is not None:  # checkpoints signed with the coordinator's own Transit key
            self.auditor.writer.attach_signer(TransitSigner.for_client(vault))
        self.tokens = TaskTokens(
            vault,
            js,
            self.topology,
            tiers=load_agent_tiers(self.settings.agent_tiers_file),
            auditor=self.auditor,
            budget_ledger=self.settings.run_workers,
        )
        self.dispatcher = Dispatcher(
            Registry(js, self.topology, max_staleness_s=0.5),
            self.workload,
            tool_proxy_address=self.settings.tool_proxy_address,
            task_streams=self.settings.task_streams,
        )
        self._planner_channel = self.workload.channel(
            self.settings.planner_address,
            peer=self.workload.peer("service", "planner"),
            service="coordinator",
        )
        if self.settings.tool_proxy_address:  # DecideApproval: tool-approval gates
            self._tool_proxy_channel = self.workload.channel(
                self.settings.tool_proxy_address,
                peer=self.workload.peer("service", "tool-proxy"),
                service="coordinator",
            )
        admission = Admission(
            js,
            consumers=[
                (self.topology.wf_events_stream, STARTS_DURABLE),
                (self.topology.work_stream, DURABLE),
            ],
            limit=self.settings.max_active_workflows,
        )
        policies: PolicySource | None = None
        if self.workload.certificate is None:
            log.warning("control_plane_unauthorized", reason="plaintext debug coordinator")
        elif self.settings.policy_source == "distributed":
            self.distributed = DistributedPolicySet(
                js, self.topology, freshness_s=self.settings.policy_freshness_s
            )
            self.distributed.start()
            if not await self.distributed.wait_ready(self.settings.startup_timeout_s):
                log.warning("policy_set_not_received", within_s=self.settings.startup_timeout_s)
            policies = self.distributed
        else:
            self.policy_store = PolicyStore(
                self.settings.policy_dir, poll_interval_s=self.settings.policy_poll_interval_s
            )
            await self.policy_store.start()  # PolicyLoadError: nothing valid to decide with
            policies = self.policy_store
        authz = ControlPlaneAuthorization(
            policies,
            self.auditor,
            subject_claim=self.settings.human_subject_claim,
            groups_claim=self.settings.human_groups_claim,
        )
        servicer = CoordinatorServicer(
            store,
            js,
            planner_pb2_grpc.PlannerServiceStub(self._planner_channel),
            self.tokens,
            self.settings,
            admission,
            ToolApprovals(
                tool_proxy_pb2_grpc.ToolProxyServiceStub(self._tool_proxy_channel)
                if self._tool_proxy_channel is not None
                else None
            ),
            authz,
            # Its own view of the registry: a start's read must not refresh the snapshot
            # dispatch picks replicas from (that one ages on its own clock).
            PlanCache(Registry(js, self.topology, max_staleness_s=0.5)),
        )
        # The A2A face: another binding of the same API, through the same handlers.
        cards = AgentCards(
            servicer.planner,
            CardKeys(vault) if vault is not None else None,
            self.settings.public_url,
        )
        a2a = A2AServicer(servicer, cards, wait_s=self.settings.a2a_wait_s)
        card_servicer = AgentCardServicer(cards)
        self.server = GrpcServer(
            name="coordinator",
            settings=self.settings,
            register=[
                lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
                    servicer, s
                ),
                lambda s: a2a_pb2_grpc.add_A2AServiceServicer_to_server(a2a, s),
                lambda s: agent_cards_pb2_grpc.add_AgentCardServiceServicer_to_server(
                    card_servicer, s
                ),
            ],
            service_names=[SERVICE_NAME, A2A_SERVICE_NAME, CARD_SERVICE_NAME],
            identity=self.workload.certificate,
        )
        if self.settings.run_workers:
            budgets = TaskBudgets(
                BudgetMirror(await js.key_value(self.topology.budgets_bucket)),
                max_task_tool_calls=MAX_USES,
            )
            self.runner = Runner(
                js, self.tokens, self.topology, store, self.dispatcher, self.settings, budgets
            )
            await self.runner.start()
            self.timers = Timers(store)
            await self.timers.start()
            self.retention = Retention(
                store,
                retention_s=self.settings.retention_s,
                interval_s=self.settings.retention_interval_s,
            )
            self.retention.start()
            # An operator's freeze revokes the tokens of the agent's attempts running here.
            self.frozen = FrozenAgents(js, self.topology, on_freeze=self.runner.agent_frozen)
            self.frozen.start()
        await self.server.start()
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr="127.0.0.1")
        return self.server.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self.retention is not None:
            await self.retention.stop()
        if self.timers is not None:
            await self.timers.stop()
        if self.frozen is not None:
            await self.frozen.stop()
        if self.runner is not None:
            await self.runner.stop()
        if self.policy_store is not None:
            await self.policy_store.stop()
        if self.distributed is not None:
            await self.distributed.stop()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        # Revocations under way write audit records; the auditor's final checkpoint is
        # signed with the Vault login the tokens hold: drain, stop the auditor, then close.
        if self.tokens is not None:
            await self.tokens.drain()
        if self.auditor is not None:
            await self.auditor.stop()
        if self.tokens is not None:
            await self.tokens.close()
        if self._planner_channel is not None:
            await self._planner_channel.close()
        if self._tool_proxy_channel is not None:
            await self._tool_proxy_channel.close()
        if self.workload is not None:
            await self.workload.close()
        if self._nc is not None:
            await close(self._nc)
