"""The tool proxy as one object with start()/stop(): alone under `python -m
services.tool_proxy`, or composed with other services in one process for tests."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import grpc
import structlog
from nats.aio.client import Client

from services.tool_proxy.approvals import ApprovalStore
from services.tool_proxy.budgets import LiveBudgets
from services.tool_proxy.embedded_policy import EmbeddedPolicy
from services.tool_proxy.idempotency import IdempotencyStore
from services.tool_proxy.limits import RateLimiter
from services.tool_proxy.mcp_service import (
    MCP_SERVICE_NAME,
    McpServicer,
    mcp_servicer,
    register_mcp,
)
from services.tool_proxy.service import ToolProxyServicer, safe_deserializer
from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tokens import TokenChecker, UseLedger
from services.tool_proxy.tools.builtin import builtin_tools
from services.tool_proxy.tools.registry import ToolRegistry
from tessera import a2a_agents
from tessera.audit import AuditWriter, hmac_digest
from tessera.frozen import FrozenAgents
from tessera.policy.distribution import DistributedPolicySet
from tessera.policy.store import PolicyStore
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import Unavailable
from tessera.runtime.grpc_server import GrpcServer
from tessera.runtime.identity import Workload
from tessera.runtime.nats_permissions import streams_used
from tessera.runtime.startup import until_ready
from tessera.v1 import policy_pb2_grpc, tool_proxy_pb2
from tessera.vault.audit_keys import TransitSigner, read_hmac_key
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultConfigError, VaultUnavailable

if TYPE_CHECKING:
    from services.tool_proxy.tools.a2a_backend import A2AAgents
    from services.tool_proxy.tools.mcp_backend import McpServers

log = structlog.get_logger(__name__)
SERVICE_NAME = tool_proxy_pb2.DESCRIPTOR.services_by_name["ToolProxyService"].full_name
REVOCATION_KIND = "token.revoked"


class ToolProxy:
    """Owns the proxy's connections. ``registry`` is public: tests (and embedders) may
    register extra tools on it before or after ``start()``."""

    def __init__(self, settings: ToolProxySettings, *, replica_id: str = "") -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self.registry = ToolRegistry()
        self.replica_id = replica_id or settings.replica_id
        self.server: GrpcServer | None = None
        self.servicer: ToolProxyServicer | None = None
        self.mcp_servicer: McpServicer | None = None
        self.tokens: TokenChecker | None = None
        self._nc: Client | None = None
        self._vault: VaultClient | None = None
        self._policy_channel: grpc.aio.Channel | None = None
        self.policy_store: PolicyStore | None = None
        """The embedded policy set (``policy_mode = "embedded"`` only)."""
        self._mcp: McpServers | None = None
        self._a2a: A2AAgents | None = None
        self._audit: AuditWriter | None = None
        self._embedded: EmbeddedPolicy | None = None
        self._frozen: FrozenAgents | None = None
        self.distributed: DistributedPolicySet | None = None
        """The policy service's set (``policy_mode = "distributed"`` only)."""
        self.workload: Workload | None = None

    @property
    def address(self) -> str:
        if self.server is None:
            raise RuntimeError("tool proxy not started")
        return self.server.address

    async def start(self) -> str:
        """Connect NATS, Vault, the policy service (or load the embedded policy set) and
        MCP servers, then serve; the address. Anything that cannot be reached at start-up,
        or an invalid embedded policy set, fails the start."""
        s = self.settings
        if s.vault_approle_file is None:
            raise VaultConfigError("TESSERA_VAULT_APPROLE_FILE is required")
        if s.policy_mode == "embedded":
            store = PolicyStore(s.policy_dir, poll_interval_s=s.policy_poll_interval_s)
            await store.start()  # PolicyLoadError: nothing valid to decide with
            self.policy_store = store
        approle_file = s.vault_approle_file
        self._vault = await until_ready(
            lambda: VaultClient.from_approle_file(
                s.vault_addr,
                approle_file,
                timeout_s=s.vault_timeout_s,
                attempts=s.vault_attempts,
                source_address=s.resolved_vault_source_address(),
            ),
            what="vault login",
            within_s=s.startup_timeout_s,
            retry_if=lambda exc: isinstance(exc, VaultUnavailable),
        )
        # Identity before NATS: NATS maps this workload's certificate to its permissions.
        workload = self.workload = await Workload.start(s, vault=self._vault)
        self._nc = await connect(
            s.nats_url,
            name=f"tool-proxy-{self.replica_id}",
            initial_timeout_s=s.startup_timeout_s,
            **workload.nats_options(s),
        )
        js = self._nc.jetstream()
        await declare(
            js,
            self.topology,
            replicas=s.jetstream_replicas,
            within_s=s.startup_timeout_s,
            leaders_of=streams_used("tool-proxy", self.topology),
        )
        idem_kv = await js.key_value(self.topology.idempotency_bucket)
        approvals_kv = await js.key_value(self.topology.approvals_bucket)
        budgets_kv = await js.key_value(self.topology.budgets_bucket)  # read only

        # Checkpoints signed with this identity's own Transit key (receipts need them).
        audit = AuditWriter(
            js,
            self.topology,
            writer=f"tool-proxy-{self.replica_id}",
            actor="tool-proxy",
            signer=TransitSigner.for_client(self._vault),
        )
        await audit.start()
        self._audit = audit
        # One HMAC key for every replica and restart, from Vault (or an explicit override).
        key = (
            s.audit_hmac_key.get_secret_value().encode()
            if s.audit_hmac_key is not None
            else await read_hmac_key(self._vault)
        )

        idempotency = IdempotencyStore(
            idem_kv,
            lease_s=s.idempotency_lease_s,
            finish_within_s=s.idempotency_finish_within_s,
        )
        for tool in builtin_tools(js, self.topology, in_flight=idempotency.in_flight):
            if self.registry.get(tool.spec.name) is None:
                self.registry.register(tool)
        if s.mcp_servers is not None:
            from services.tool_proxy.tools.mcp_backend import McpServers  # only when asked

            self._mcp = McpServers.from_file(s.mcp_servers, timeout_s=s.mcp_timeout_s)
            for tool in await self._mcp.start():
                self.registry.register(tool)

        if s.a2a_agents_file is not None:
            declared = a2a_agents.load(s.a2a_agents_file)  # DeclarationError: no start
            if declared:
                from services.tool_proxy.tools.a2a_backend import A2AAgents  # only when asked

                self._a2a = A2AAgents(declared)
                for tool in self._a2a.tools():
                    self.registry.register(tool)

        ledger = UseLedger(idem_kv)
        self.tokens = TokenChecker(
            self._vault, ttl_s=s.token_cache_ttl_s, max_entries=s.token_cache_size
        )
        self.tokens.on_revoked(ledger.forget)
        await self.tokens.subscribe(self._nc, self.topology.events_subject(REVOCATION_KIND))

        # Frozen agents (the registry's bucket): their calls are refused by policy. Until
        # the bucket is read once, every call is refused (UNAVAILABLE, FROZEN_UNKNOWN).
        self._frozen = FrozenAgents(js, self.topology)
        self._frozen.start()
        await self._frozen.wait_ready(s.startup_timeout_s)

        embedded: EmbeddedPolicy | None = None
        stub: policy_pb2_grpc.PolicyServiceStub | None = None
        if self.policy_store is not None:
            embedded = EmbeddedPolicy(self.policy_store)
            await embedded.follow_reloads(self._nc, self.topology.policy_reload_subject)
            self._embedded = embedded
        elif s.policy_mode == "distributed":
            self.distributed = DistributedPolicySet(
                js, self.topology, freshness_s=s.policy_freshness_s
            )
            self.distributed.start()
            if not await self.distributed.wait_ready(s.startup_timeout_s):
                # Serve anyway: every call is refused (POLICY_STALE) until a set arrives.
                log.warning("policy_set_not_received", within_s=s.startup_timeout_s)
            embedded = self._embedded = EmbeddedPolicy(self.distributed)
        else:
            self._policy_channel = workload.channel(
                s.policy_address, peer=workload.peer("service", "policy"), service="tool-proxy"
            )
            stub = policy_pb2_grpc.PolicyServiceStub(self._policy_channel)
        self.servicer = ToolProxyServicer(
            settings=s,
            registry=self.registry,
            tokens=self.tokens,
            ledger=ledger,
            vault=self._vault,
            policy=stub,
            embedded_policy=embedded,
            limiter=RateLimiter(
                agent_rate=s.agent_rate_per_s,
                agent_burst=s.agent_burst,
                tool_rate=s.tool_rate_per_s,
                tool_burst=s.tool_burst,
            ),
            idempotency=idempotency,
            approvals=ApprovalStore(approvals_kv),
            audit=audit,
            digest=lambda value: str(hmac_digest(key, value)),
            budgets=LiveBudgets(budgets_kv, default_cents=s.default_budget_remaining_cents),
            frozen=self._frozen,
        )
        servicer = self.servicer
        # People's MCP clients, through the front door (decided in-process only).
        mcp = self.mcp_servicer = mcp_servicer(
            servicer,
            settings=s,
            minter=self._vault,
            policy_source=embedded.store if embedded is not None else None,
            audit=audit,
        )
        self.server = GrpcServer(
            name="tool-proxy",
            settings=s,
            register=[
                lambda server: _register(server, servicer),
                lambda server: register_mcp(server, mcp),
            ],
            service_names=[SERVICE_NAME, MCP_SERVICE_NAME],
            identity=workload.certificate,
        )
        await self.server.start()
        if s.metrics_port:
            from prometheus_client import start_http_server  # only when asked: ~15 ms

            start_http_server(s.metrics_port, addr="127.0.0.1")
        log.info(
            "tool_proxy_started",
            address=self.server.address,
            tools=len(self.registry),
            policy_mode=s.policy_mode,
            policy_set=(
                self.policy_store.current.version
                if self.policy_store
                else self.distributed.version
                if self.distributed
                else None
            ),
        )
        return self.server.address

    async def stop(self) -> None:
        """Stop serving, flush audit records, close every connection. Idempotent."""
        if self.server is not None:
            await self.server.stop()
        if self.mcp_servicer is not None:
            await self.mcp_servicer.face.calls.drain()
        if self.servicer is not None:
            await self.servicer.drain()
        if self._audit is not None:
            with contextlib.suppress(Unavailable):  # drain() logged it
                await self._audit.close()
            self._audit = None
        if self.tokens is not None:
            await self.tokens.close()
        if self._frozen is not None:
            await self._frozen.stop()
            self._frozen = None
        if self._mcp is not None:
            await self._mcp.stop()
            self._mcp = None
        if self._a2a is not None:
            await self._a2a.stop()
            self._a2a = None
        if self._policy_channel is not None:
            await self._policy_channel.close()
            self._policy_channel = None
        if self._embedded is not None:
            await self._embedded.close()
            self._embedded = None
        if self.policy_store is not None:
            await self.policy_store.stop()
            self.policy_store = None
        if self.distributed is not None:
            await self.distributed.stop()
            self.distributed = None
        if self.workload is not None:
            await self.workload.close()
            self.workload = None
        if self._vault is not None:
            await self._vault.close()
            self._vault = None
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self._nc = None


def _register(server: grpc.aio.Server, servicer: ToolProxyServicer) -> None:
    """Like the generated add_…_to_server, but requests are decoded by our code so that
    undecodable bytes answer INVALID_ARGUMENT rather than grpcio's INTERNAL."""
    handlers = {
        "InvokeTool": grpc.unary_unary_rpc_method_handler(
            servicer.InvokeTool,
            request_deserializer=safe_deserializer(tool_proxy_pb2.InvokeToolRequest),
            response_serializer=tool_proxy_pb2.InvokeToolResponse.SerializeToString,
        ),
        "ListTools": grpc.unary_unary_rpc_method_handler(
            servicer.ListTools,
            request_deserializer=safe_deserializer(tool_proxy_pb2.ListToolsRequest),
            response_serializer=tool_proxy_pb2.ListToolsResponse.SerializeToString,
        ),
        "DecideApproval": grpc.unary_unary_rpc_method_handler(
            servicer.DecideApproval,
            request_deserializer=safe_deserializer(tool_proxy_pb2.DecideApprovalRequest),
            response_serializer=tool_proxy_pb2.DecideApprovalResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
