"""The mesh's workflow services composed in one process against the real NATS: planner,
coordinator replicas and agents, each the same object `python -m` would run."""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import grpc
import yaml
from google.protobuf import duration_pb2, json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.coordinator.app import Coordinator
from services.coordinator.settings import CoordinatorSettings
from services.planner.service import PlannerService
from services.planner.settings import PlannerSettings
from services.policy.app import PolicyService
from services.policy.settings import PolicySettings
from services.registry.app import RegistryApp
from services.registry.settings import RegistrySettings
from services.tool_proxy.app import ToolProxy
from services.tool_proxy.settings import ToolProxySettings
from tessera.agent import Agent
from tessera.identity.names import WorkloadName
from tessera.launcher.ports import free_port
from tessera.runtime.config import ServiceSettings
from tessera.runtime.grpc_client import channel
from tessera.runtime.identity import Workload
from tessera.runtime.principal import CLAIMS_HEADER, encode_claims
from tessera.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, events_pb2, planner_pb2
from tessera.vault import bootstrap

REPO = Path(__file__).resolve().parents[2]


class Vault(Protocol):
    @property
    def addr(self) -> str: ...
    @property
    def root_token(self) -> str: ...


WS = coordinator_pb2.WorkflowState
APPROVER_GROUPS = ("approvers", "compliance-officers", "finance-approvers")
"""Groups of vault/humans.yaml that decide gates (policy/policies/50_workflows.cedar)."""
REFERENCE_AGENTS = (
    "triage",
    "billing",
    "technical",
    "account",
    "synthesis",
    "document_analysis",
    "risk",
    "compliance",
    "sourcing",
    "negotiation",
    "credit",
    "fraud",
    "churn",
    "aggregator",
)
TERMINAL = {
    WS.WORKFLOW_STATE_SUCCEEDED,
    WS.WORKFLOW_STATE_FAILED,
    WS.WORKFLOW_STATE_CANCELLED,
    WS.WORKFLOW_STATE_COMPENSATED,
}


def vault_dir_with_agents(agents: Iterable[Agent]) -> Path:
    """The repo's vault/ with an identity for every test agent it does not list yet, so
    a test agent gets its own certificate like a deployed one."""
    target = Path(tempfile.mkdtemp(prefix="vault-")) / "vault"
    shutil.copytree(REPO / "vault", target)
    identities_file = target / "identities.yaml"
    identities = yaml.safe_load(identities_file.read_text())
    known = {entry["name"] for entry in identities["agents"]}
    identities["agents"] += [{"name": a.name} for a in agents if a.name not in known]
    identities_file.write_text(yaml.safe_dump(identities))
    return target


def reference_agent(module: str) -> Agent:
    return importlib.import_module(f"services.agents.{module}.agent").agent  # type: ignore[no-any-return]


class Mesh:
    """Start with `async with Mesh(...)`; `stub` talks to the first coordinator."""

    def __init__(
        self,
        nats_url: str,
        namespace: str,
        *,
        agents: Iterable[Agent] = (),
        coordinators: int = 1,
        vault: Vault | None = None,
        jetstream_replicas: int = 1,
        tool_proxy_process: bool = False,
        **coordinator_settings: Any,
    ) -> None:
        """`vault`: govern tool calls (OpenBao bootstrapped from vault/, the policy
        service and the tool proxy in-process); agents that call tools need it.
        `jetstream_replicas`: replicas of the streams and buckets (3 on a NATS cluster)."""
        self.jetstream_replicas = jetstream_replicas
        self.tool_proxy_process = tool_proxy_process
        """Run the tool proxy as `python -m services.tool_proxy` (killable with SIGKILL,
        see :meth:`kill_tool_proxy`) on a fixed port, instead of in this process."""
        self._proxy_proc: subprocess.Popen[bytes] | None = None
        self.vault = vault
        self.approles: dict[str, Path] = {}
        self.nats_url = nats_url
        self.namespace = namespace
        self.agents = list(agents)
        self.coordinator_count = coordinators
        self.coordinator_settings = coordinator_settings
        self.coordinators: list[Coordinator] = []
        self._workloads: dict[str, Workload] = {}
        self._stack = AsyncExitStack()
        self.registry_address = ""
        self._people: dict[tuple[str, str, tuple[str, ...]], Any] = {}

    def common(self) -> dict[str, Any]:
        common = {
            "nats_url": self.nats_url,
            "namespace": self.namespace,
            "listen": "127.0.0.1:0",
            "jetstream_replicas": self.jetstream_replicas,
        }
        if self.registry_address:  # where agents register (the registry service)
            common["registry_address"] = self.registry_address
        return common

    def identity(self, name: str) -> dict[str, Any]:
        """Settings that give a component its workload identity (governed meshes: every
        hop is mTLS, as under `tessera up`); nothing without Vault (plaintext mesh)."""
        if self.vault is None:
            return {}
        return {
            "vault_addr": self.vault.addr,
            "vault_approle_file": self.approles[name],
            "insecure_plaintext": False,
        }

    async def _operator_channel(self, address: str, peer: str) -> grpc.aio.Channel:
        """The test's own client: the operator identity when governed."""
        return await self.channel_as("operator", address, peer=peer)

    async def channel_as(
        self, identity: str, address: str, *, peer: str, **options: Any
    ) -> grpc.aio.Channel:
        """A channel to ``peer`` (an identity name, e.g. ``agent-billing``) presenting the
        certificate of ``identity``: how a test acts as one of the mesh's workloads.
        Plaintext in an ungoverned mesh."""
        options.setdefault("default_timeout_s", 30)
        if self.vault is None:
            return channel(address, **options)
        workload = self._workloads.get(identity)
        if workload is None:
            settings = ServiceSettings(**self.common(), **self.identity(identity))
            workload = self._workloads[identity] = await Workload.start(settings)
            self._stack.push_async_callback(workload.close)
        name = WorkloadName.of(peer)
        return workload.channel(address, peer=workload.peer(name.kind, name.name), **options)

    async def __aenter__(self) -> Mesh:
        try:
            return await self._enter()
        except BaseException:
            await self._stack.aclose()  # what did start (a proxy process too) is stopped
            raise

    async def _enter(self) -> Mesh:
        self.tool_proxy_address = ""
        if self.vault is not None:
            await self._start_governance(self.vault)
        registry = RegistryApp(RegistrySettings(**self.common(), **self.identity("registry")))
        await registry.start()
        self._stack.push_async_callback(registry.stop)
        self.registry_address = registry.address
        planner = PlannerService(PlannerSettings(**self.common(), **self.identity("planner")))
        await planner.start()
        self._stack.push_async_callback(planner.stop)
        self.planner_address = planner.address
        for agent in self.agents:
            settings = ServiceSettings(**self.common(), **self.identity(f"agent-{agent.name}"))
            await agent.start(settings=settings)
            self._stack.push_async_callback(agent.stop)
        for _ in range(self.coordinator_count):
            await self.add_coordinator()
        self._stack.push_async_callback(self._close_channel)
        if self.coordinators:
            await self.use_coordinator(self.coordinators[0].address)
        return self

    async def use_coordinator(self, address: str) -> None:
        """Point `stub` at the coordinator serving `address`."""
        await self._close_channel()
        self.coordinator_address = address
        self.channel: grpc.aio.Channel | None = await self._operator_channel(address, "coordinator")
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    async def _close_channel(self) -> None:
        if getattr(self, "channel", None) is not None:
            await self.channel.close()  # type: ignore[union-attr]
            self.channel = None

    async def _start_governance(self, vault: Vault) -> None:
        secrets_dir = Path(tempfile.mkdtemp(prefix="approles-"))
        self.approles = await asyncio.to_thread(
            bootstrap.apply,
            vault.addr,
            vault.root_token,
            vault_dir_with_agents(self.agents),
            secrets_dir,
        )
        policy = PolicyService(
            PolicySettings(**self.common(), **self.identity("policy"), policy_dir=REPO / "policy")
        )
        await policy.start()
        self._stack.push_async_callback(policy.stop)
        self.policy: PolicyService | None = policy
        self.policy_address = policy.address
        if self.tool_proxy_process:
            self.tool_proxy_address = f"127.0.0.1:{free_port()}"
            await self.start_tool_proxy()
            self._stack.callback(self.kill_tool_proxy)
            return
        proxy = ToolProxy(
            ToolProxySettings(
                **self.common(),
                **self.identity("tool-proxy"),
                policy_address=policy.address,
            )
        )
        await proxy.start()
        self._stack.push_async_callback(proxy.stop)
        self.tool_proxy_address = proxy.address

    async def start_tool_proxy(self) -> None:
        """(Re)start the tool proxy process on its address; returns once it serves."""
        assert self.vault is not None and self.tool_proxy_process
        env = {
            **os.environ,
            "TESSERA_NATS_URL": self.nats_url,
            "TESSERA_NAMESPACE": self.namespace,
            "TESSERA_TOOL_PROXY_LISTEN": self.tool_proxy_address,
            "TESSERA_VAULT_ADDR": self.vault.addr,
            "TESSERA_VAULT_APPROLE_FILE": str(self.approles["tool-proxy"]),
            "TESSERA_POLICY_ADDRESS": self.policy_address,
            "TESSERA_JETSTREAM_REPLICAS": str(self.jetstream_replicas),
            "TESSERA_INSECURE_PLAINTEXT": "0",
        }
        self._proxy_proc = subprocess.Popen(  # noqa: ASYNC220 (fork/exec returns at once)
            [sys.executable, "-m", "services.tool_proxy"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with await self._operator_channel(self.tool_proxy_address, "tool-proxy") as ch:
            await wait_until_serving(ch, timeout=30)

    def kill_tool_proxy(self) -> None:
        """SIGKILL the tool proxy process (nothing flushed, nothing drained)."""
        if self._proxy_proc is not None and self._proxy_proc.poll() is None:
            self._proxy_proc.send_signal(signal.SIGKILL)
            self._proxy_proc.wait(timeout=10)

    async def add_coordinator(self, **overrides: Any) -> Coordinator:
        overrides = {**self.identity("coordinator"), **overrides}
        settings = CoordinatorSettings(
            **self.common(),
            planner_address=self.planner_address,
            tool_proxy_address=self.tool_proxy_address,
            **{**self.coordinator_settings, **overrides},
        )
        coordinator = Coordinator(settings)
        await coordinator.start()
        self._stack.push_async_callback(coordinator.stop)
        self.coordinators.append(coordinator)
        return coordinator

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def start(self, goal: str, **inputs: Any) -> str:
        request = coordinator_pb2.StartWorkflowRequest(
            request_id=uuid.uuid4().hex, goal=goal, inputs=_struct(inputs)
        )
        response = await self.stub.StartWorkflow(request)
        return response.workflow.name

    async def get(self, name: str) -> coordinator_pb2.Workflow:
        return (await self.stub.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name=name))).workflow

    async def events(self, name: str) -> list[events_pb2.WorkflowEvent]:
        """Every event so far (the watch stream replays history, then follows)."""
        workflow = await self.get(name)
        out: list[events_pb2.WorkflowEvent] = []
        if workflow.event_count == 0:
            return out
        call = self.stub.WatchWorkflow(coordinator_pb2.WatchWorkflowRequest(name=name), timeout=10)
        async for item in call:
            out.append(item.event)
            if item.event.sequence >= workflow.event_count:
                call.cancel()
                break
        return out

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[coordinator_pb2.Workflow], bool],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> coordinator_pb2.Workflow:
        """Follow the workflow's event stream until `predicate(workflow)` holds."""
        deadline = time.monotonic() + timeout
        call = self.stub.WatchWorkflow(
            coordinator_pb2.WatchWorkflowRequest(name=name), timeout=timeout
        )
        try:
            workflow = await self.get(name)
            if predicate(workflow):
                return workflow
            async for _ in call:
                workflow = await self.get(name)
                if predicate(workflow):
                    return workflow
            workflow = await self.get(name)
            if predicate(workflow):
                return workflow
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            call.cancel()
        left = deadline - time.monotonic()
        raise AssertionError(
            f"{name} did not reach the expected state within {timeout}s "
            f"({left:.1f}s left): {WS.Name(workflow.state)}"
        )

    async def finished(self, name: str, timeout: float = 30.0) -> coordinator_pb2.Workflow:  # noqa: ASYNC109
        return await self.wait_for(name, lambda w: w.state in TERMINAL, timeout=timeout)

    async def parked(self, name: str, timeout: float = 30.0) -> coordinator_pb2.Workflow:  # noqa: ASYNC109
        return await self.wait_for(
            name,
            lambda w: w.state in TERMINAL or w.state == WS.WORKFLOW_STATE_WAITING_APPROVAL,
            timeout=timeout,
        )

    async def as_person(
        self, who: str, groups: Iterable[str] = APPROVER_GROUPS
    ) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        """A coordinator stub acting for the person ``who`` the front door verified: the
        test plays Envoy (the gateway's certificate, and the claims header Envoy forwards
        for a verified token). The real front door is tested in test_human_identity."""
        address = self.coordinator_address
        key = (address, who, tuple(sorted(groups)))
        stub = self._people.get(key)
        if stub is None:
            claims = encode_claims({"preferred_username": who, "groups": sorted(groups)})
            ch = await self.channel_as(
                "gateway", address, peer="coordinator", metadata=[(CLAIMS_HEADER, claims)]
            )
            self._stack.push_async_callback(ch.close)
            stub = self._people[key] = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        return stub

    async def decide(
        self,
        gate: str,
        *,
        approve: bool,
        by: str = "tester",
        groups: Iterable[str] = APPROVER_GROUPS,
    ) -> coordinator_pb2.Gate:
        """Decide ``gate`` as the person ``by`` (a member of every approver group)."""
        decision = (
            coordinator_pb2.GATE_DECISION_APPROVE
            if approve
            else coordinator_pb2.GATE_DECISION_REJECT
        )
        stub = await self.as_person(by, groups)
        response = await stub.DecideGate(
            coordinator_pb2.DecideGateRequest(name=gate, decision=decision)
        )
        return response.gate


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def as_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def task(
    task_id: str, capability: str, *depends_on: str, max_attempts: int = 3, timeout_s: int = 20
) -> planner_pb2.TaskSpec:
    """One agent task of an explicit plan (any version of `capability` 1.x)."""
    return planner_pb2.TaskSpec(
        id=task_id,
        capability=capability,
        version="^1.0",
        depends_on=list(depends_on),
        max_attempts=max_attempts,
        timeout=duration_pb2.Duration(seconds=timeout_s),
    )


def task_graph(
    template: str,
    *tasks: planner_pb2.TaskSpec,
    max_iterations: int = 40,
    max_tokens: int = 10_000,
) -> planner_pb2.TaskGraph:
    """An explicit plan with a budget generous enough not to be what a test measures."""
    return planner_pb2.TaskGraph(
        template=template,
        tasks=list(tasks),
        max_iterations=max_iterations,
        budget=common_pb2.Budget(
            max_tokens=max_tokens,
            max_cost_micros=10**6,
            max_tool_calls=10,
            max_iterations=max_iterations,
        ),
    )


async def wait_until_serving(ch: grpc.aio.Channel, *, timeout: float) -> None:  # noqa: ASYNC109
    """Poll grpc.health.v1 over ``ch`` until SERVING (a start-up budget, polled)."""
    deadline = time.monotonic() + timeout
    stub = health_pb2_grpc.HealthStub(ch)
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)
