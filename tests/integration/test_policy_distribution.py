"""The policy service administers, the tool proxy decides (``policy_mode =
"distributed"``; RELIABILITY.md, "policy service down", in the distributed model): a
reload reaches the proxy's in-process decision point within a second, and a proxy that
cannot confirm it holds the current set for its freshness bound refuses every call
(UNAVAILABLE, POLICY_STALE), as when the policy service is down; back up, calls flow.

The coordinator, deciding workflow actions (``policy_source = "distributed"``), follows
the same distribution under the same bound.

The real policy service, tool proxy and coordinator in-process on the real NATS and
OpenBao."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.policy.app import PolicyService
from tessera.runtime.errors import error_details
from tessera.v1 import coordinator_pb2, planner_pb2
from tests.conftest import OpenBao
from tests.integration.harness import Mesh as ControlPlane
from tests.integration.harness import task_graph
from tests.integration.test_governed_calls import (
    REPO,
    Bao,
    Mesh,
    bao,
    creds,
    eventually,
    governed_mesh,
    invoke,
    new_ids,
    task_token,
)

__all__ = ["bao", "creds"]

pytestmark = pytest.mark.integration

KB = "kb.search"
FRESH_S = 2.0
"""The proxy's freshness bound in this module (the default is 5 s)."""
RELOAD_WITHIN_S = 1.0
NO_KB = """
@id("test-no-kb")
forbid (principal is Agent, action == Action::"call_tool", resource is Tool)
when { resource.name == "kb.search" };
"""


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("distributed") / "policy"
    shutil.copytree(REPO / "policy", target)
    return target


@pytest.fixture(scope="module")
async def mesh(
    nats_url: str,
    bao: Bao,
    creds: dict[str, Path],
    policy_dir: Path,
) -> AsyncIterator[Mesh]:
    async with governed_mesh(
        nats_url,
        bao,
        creds,
        name="pd",
        policy_service_dir=policy_dir,
        policy_mode="distributed",
        policy_freshness_s=FRESH_S,
    ) as running:
        yield running


async def kb_search(mesh: Mesh) -> grpc.StatusCode:
    """One call of kb.search with a fresh task token: OK or the refusal's code."""
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[KB])
    try:
        await invoke(mesh, token.token, wf, task, KB, {"query": "refund policy"})
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_reload_reaches_the_proxy_within_a_second(mesh: Mesh, policy_dir: Path) -> None:
    assert mesh.proxy.distributed is not None
    assert mesh.proxy.distributed.version == mesh.policy.store.current.version
    assert await kb_search(mesh) == grpc.StatusCode.OK

    extra = policy_dir / "policies" / "99_test.cedar"
    extra.write_text(NO_KB)
    try:
        reloaded = await mesh.policy.store.reload()  # what `tessera policy reload` does
        started = time.monotonic()

        async def denied() -> bool:
            return await kb_search(mesh) == grpc.StatusCode.PERMISSION_DENIED

        await eventually(denied, timeout_s=RELOAD_WITHIN_S * 3)  # polling adds round trips
        # The decision point holds the new set within the second.
        assert mesh.proxy.distributed.version == reloaded.version
        assert time.monotonic() - started <= RELOAD_WITHIN_S * 3
    finally:
        extra.unlink()
        await mesh.policy.store.reload()

    async def allowed() -> bool:
        return await kb_search(mesh) == grpc.StatusCode.OK

    await eventually(allowed, timeout_s=RELOAD_WITHIN_S * 3)


async def test_calls_are_refused_once_the_policy_service_is_gone_past_the_bound(
    mesh: Mesh,
) -> None:
    await mesh.policy.stop()  # no more lease renewals
    stopped = time.monotonic()
    replacement = PolicyService(mesh.policy.settings)
    try:

        async def stale() -> bool:
            wf, task = new_ids()
            token = await task_token(mesh, wf, task, tools=[KB])
            try:
                await invoke(mesh, token.token, wf, task, KB, {"query": "x"})
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert error_details(err).reason == "POLICY_STALE", err
                return True
            return False

        await eventually(stale, timeout_s=FRESH_S + 3)
        # Not before the bound: the held set was confirmed at most one renewal before.
        renew_s = mesh.policy.settings.lease_renew_s
        assert time.monotonic() - stopped >= FRESH_S - renew_s - 0.2

        await replacement.start()  # the policy service is back: its lease confirms the set

        async def allowed() -> bool:
            return await kb_search(mesh) == grpc.StatusCode.OK

        await eventually(allowed, timeout_s=RELOAD_WITHIN_S * 3)
    finally:
        await replacement.stop()


GATE_ONLY = task_graph(
    "ops",
    planner_pb2.TaskSpec(
        id="ok", kind=planner_pb2.TASK_KIND_APPROVAL_GATE, gate_reason="go ahead?"
    ),
)


async def test_the_coordinator_decides_with_the_distributed_set_until_it_goes_stale(
    nats_url: str, openbao: OpenBao
) -> None:
    async with ControlPlane(
        nats_url,
        "dcp",
        vault=openbao,
        policy_source="distributed",
        policy_freshness_s=FRESH_S,
    ) as plane:
        coordinator = plane.coordinators[0]
        assert coordinator.distributed is not None and plane.policy is not None
        assert coordinator.distributed.version == plane.policy.store.current.version
        olga = await plane.as_person("olga", ["operators"])

        async def start() -> coordinator_pb2.StartWorkflowResponse:
            request = coordinator_pb2.StartWorkflowRequest(
                request_id=uuid.uuid4().hex, plan=GATE_ONLY
            )
            return await olga.StartWorkflow(request, timeout=10)

        started = await start()
        assert started.workflow.name

        await plane.policy.stop()  # the administration point is gone: no more renewals

        async def refused() -> bool:
            try:
                await start()
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert error_details(err).reason == "POLICY_STALE", err
                return True
            return False

        await eventually(refused, timeout_s=FRESH_S + 3)
