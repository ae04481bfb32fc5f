"""Effects exactly once, counted at the tool: through the real tool proxy, policy service,
NATS and OpenBao.

Stories: the idempotency bucket loses its leader just as a refund is issued, and the
refund is still recorded and replayed, never issued again; a retry takes over the claim
of an executor presumed dead and asks the tool first (the refund happened: replayed; it
never happened: issued once; the tool cannot tell: refused until a human decides); the
caller goes away in the middle of a refund, and the proxy still finishes what it started.

Executions are counted where the effect happens, in the backend, not from stored results
(the outbox's Nats-Msg-Id dedup would hide a second refund within its window). Faults are
injected around our code on the real bucket: updates of the idempotency records raise
what a leaderless bucket gives (no answer, no responders) instead of reaching it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import nats.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.kv import KeyValue

from services.tool_proxy.idempotency import IdempotencyStore
from services.tool_proxy.tools import CallInfo, SideEffect, Tool, ToolSpec
from services.tool_proxy.tools.registry import Handler
from tessera.runtime.errors import error_details
from tessera.runtime.metadata import TASK_TOKEN_METADATA
from tessera.v1 import tool_proxy_pb2
from tessera.vault import ToolSecret
from tests.integration.test_governed_calls import (
    REFUND,
    Bao,
    Mesh,
    audit_records,
    bao,
    creds,
    effects,
    eventually,
    governed_mesh,
    invoke,
    new_ids,
    refund_args,
    refused,
    task_token,
)

__all__ = ["bao", "creds"]

pytestmark = pytest.mark.integration

CHARGE = "test.charge"
"""A side-effecting test tool whose backend cannot look its effects up."""
TOKEN_MD = TASK_TOKEN_METADATA


# -- the backends, counting their effects ---------------------------------------------------


class Counted:
    """A backend that counts the calls that reached it, per workflow. ``before`` (when
    set) runs first: a test holds a call there, or lets the tool's deadline end it,
    before the effect happens."""

    def __init__(self, effect: Handler) -> None:
        self._effect = effect
        self.executions: Counter[str] = Counter()
        self.before: Callable[[], Awaitable[None]] | None = None

    async def handler(
        self, args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        if self.before is not None:
            await self.before()
        self.executions[call.workflow_id] += 1
        return await self._effect(args, secret, call)


async def _charge(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    return {"charge_id": "ch-" + call.effect_id[:12]}


@dataclasses.dataclass
class Backends:
    refund: Counted
    """The built-in billing.issue_refund (outbox and lookup), counted."""
    charge: Counted


class Clock:
    """The idempotency store's wall clock, which a test moves past a claim's lease."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def expire_leases(self) -> None:
        self.now += 3600.0


class LeaderlessKV:
    """The real idempotency bucket, except that while faults are armed, each update
    fails as a bucket electing a leader makes it fail: with no answer (the first one
    after ``lose_answer()`` is stored, only its answer is lost) or "no responders"."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._failures = 0.0
        self._lose_next_answer = False
        self.injected = 0

    def fail_updates(self, n: float) -> None:
        self._failures = n

    def lose_answer(self) -> None:
        self._lose_next_answer = True

    def heal(self) -> None:
        self._failures = 0
        self._lose_next_answer = False

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if self._failures <= 0:
            return await self._kv.update(key, value, last=last)
        self._failures -= 1
        self.injected += 1
        if self._lose_next_answer:
            self._lose_next_answer = False
            await self._kv.update(key, value, last=last)
            raise nats.errors.TimeoutError
        raise nats.errors.NoRespondersError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


@dataclasses.dataclass
class Faults:
    kv: LeaderlessKV
    clock: Clock


FINISH_WITHIN_S = 1.0
"""How long the proxy under test tries to record an outcome (the setting's default is
30 s): long enough for a few failed attempts, short enough to exhaust in a test."""


@pytest.fixture(scope="module")
async def mesh(nats_url: str, bao: Bao, creds: dict[str, Path]) -> AsyncIterator[Mesh]:
    async with governed_mesh(nats_url, bao, creds, name="eo") as running:
        yield running


@pytest.fixture(scope="module")
def backends(mesh: Mesh) -> Backends:
    """The built-in refund, counted and with a short deadline; the charge tool."""
    registry = mesh.proxy.registry
    builtin = registry.get(REFUND)
    assert builtin is not None and builtin.lookup is not None
    refund = Counted(builtin.handler)
    spec = dataclasses.replace(builtin.spec, timeout_s=0.5)
    registry.register(Tool(spec, refund.handler, builtin.lookup), replace=True)
    charge = Counted(_charge)
    registry.register(
        Tool(
            ToolSpec(
                name=CHARGE,
                description="charges a card; cannot say later whether it did",
                input_schema={"type": "object", "properties": {}, "additionalProperties": False},
                side_effect=SideEffect.EXTERNAL_ACTION,
                category="test",
                scope="test.noop",
            ),
            charge.handler,
        )
    )
    return Backends(refund=refund, charge=charge)


@pytest.fixture
async def faults(mesh: Mesh, backends: Backends) -> AsyncIterator[Faults]:
    """The proxy's idempotency store on the real bucket behind a fault injector, with a
    clock the test moves (the proxy is otherwise untouched)."""
    servicer = mesh.proxy.servicer
    assert servicer is not None
    original = servicer.idempotency
    kv = LeaderlessKV(await mesh.js.key_value(mesh.topology.idempotency_bucket))
    clock = Clock()
    servicer.idempotency = IdempotencyStore(
        kv,  # type: ignore[arg-type]
        lease_s=mesh.settings.idempotency_lease_s,
        finish_within_s=FINISH_WITHIN_S,
        clock=clock,
    )
    try:
        yield Faults(kv=kv, clock=clock)
    finally:
        servicer.idempotency = original
        backends.refund.before = backends.charge.before = None


# -- the outcome of an effect that ran is recorded -----------------------------------------


async def test_a_refund_is_recorded_through_a_leaderless_bucket_and_replayed(
    mesh: Mesh, backends: Backends, faults: Faults
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    # The bucket stores the first `done` but its answer is lost, then has no responders.
    faults.kv.fail_updates(3)
    faults.kv.lose_answer()

    first = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r-1")
    again = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r-1")

    assert faults.kv.injected == 3  # the faults did hit the outcome's recording
    assert not first.replayed and again.replayed
    assert again.result["refund_id"] == first.result["refund_id"]
    assert backends.refund.executions[wf] == 1
    assert len(await effects(mesh, wf)) == 1


async def test_an_outcome_that_cannot_be_recorded_is_unavailable_and_never_rerun(
    mesh: Mesh, backends: Backends, faults: Faults
) -> None:
    """The bucket stays leaderless longer than the proxy tries: the caller hears
    UNAVAILABLE; the claim stays, so a retry neither runs nor loses the refund."""
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    faults.kv.fail_updates(math.inf)

    details = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r"))
    assert (details.code, details.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "IDEMPOTENCY_OUTCOME_UNRECORDED",
    )
    assert details.metadata["tool"] == REFUND and details.metadata["effect_id"]

    faults.kv.heal()
    busy = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r"))
    assert busy.reason == "IDEMPOTENCY_IN_PROGRESS"  # within the claim's lease
    assert backends.refund.executions[wf] == 1


# -- a claim taken over from an executor presumed dead asks the tool first -----------------


async def test_a_taken_over_claim_replays_a_refund_that_happened(
    mesh: Mesh, backends: Backends, faults: Faults
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    faults.kv.fail_updates(math.inf)  # the refund is issued, its outcome never recorded
    await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r"))
    issued = await effects(mesh, wf)
    assert len(issued) == 1 and backends.refund.executions[wf] == 1

    faults.kv.heal()
    faults.clock.expire_leases()  # its executor is presumed dead
    retry = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r")
    later = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r")

    assert retry.replayed and later.replayed
    assert retry.result["refund_id"] == issued[0]["effect"]["refund_id"]
    assert retry.result["status"] == "issued"
    assert dict(later.result) == dict(retry.result)  # now replayed from the record
    assert backends.refund.executions[wf] == 1
    assert len(await effects(mesh, wf)) == 1
    records = await audit_records(mesh, wf)
    recovered = [r for r in records if r.outcome == "replayed" and "recovered_from" in r.details]
    assert [r.details["recovered_from"] for r in recovered] == ["backend_lookup"]


async def test_a_taken_over_claim_runs_a_refund_that_never_happened(
    mesh: Mesh, backends: Backends, faults: Faults
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])

    async def stuck_before_the_refund() -> None:
        backends.refund.before = None  # only this call
        await asyncio.Event().wait()  # until the tool's deadline ends the call

    backends.refund.before = stuck_before_the_refund
    timed_out = await refused(invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r"))
    assert timed_out.reason == "TOOL_DEADLINE_EXCEEDED"
    assert backends.refund.executions[wf] == 0 and await effects(mesh, wf) == []

    faults.clock.expire_leases()
    retry = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r")
    again = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r")

    assert not retry.replayed and again.replayed
    assert backends.refund.executions[wf] == 1
    assert len(await effects(mesh, wf)) == 1


async def test_a_taken_over_claim_of_a_tool_that_cannot_tell_waits_for_a_human(
    mesh: Mesh, backends: Backends, faults: Faults
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=["test.noop"])
    faults.kv.fail_updates(math.inf)
    await refused(invoke(mesh, token.token, wf, task, CHARGE, key="c"))
    faults.kv.heal()
    faults.clock.expire_leases()

    for _ in range(2):  # every retry, until a human decides
        details = await refused(invoke(mesh, token.token, wf, task, CHARGE, key="c"))
        assert (details.code, details.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "EFFECT_OUTCOME_UNKNOWN",
        )
    eid = details.metadata["effect_id"]
    assert details.metadata["tool"] == CHARGE
    assert details.precondition_violations[0][:2] == ("EFFECT_OUTCOME", f"idempotency/{eid}")
    assert backends.charge.executions[wf] == 1  # the original only
    records = await audit_records(mesh, wf)
    unknown = [
        r
        for r in records
        if "reason" in r.details and r.details["reason"] == "EFFECT_OUTCOME_UNKNOWN"
    ]
    assert len(unknown) == 2
    assert all(r.outcome == "refused" and r.details["effect_id"] == eid for r in unknown)

    # The human found the charge in the card processor and records it (tool proxy
    # README, "When a tool cannot tell"): the next retry replays it.
    kv = await mesh.js.key_value(mesh.topology.idempotency_bucket)
    entry = await kv.get(eid)
    record = json.loads(entry.value or b"{}")
    assert record["state"] == "started"
    resolved = {**record, "state": "done", "result": {"charge_id": "ch-found-by-hand"}}
    await kv.update(eid, json.dumps(resolved).encode(), last=entry.revision)
    replay = await invoke(mesh, token.token, wf, task, CHARGE, key="c")
    assert replay.replayed and replay.result["charge_id"] == "ch-found-by-hand"
    assert backends.charge.executions[wf] == 1


# -- the caller goes away -------------------------------------------------------------------


async def test_a_refund_whose_caller_went_away_is_finished_and_replayed(
    mesh: Mesh, backends: Backends, faults: Faults
) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    entered, go_on = asyncio.Event(), asyncio.Event()

    async def held() -> None:
        entered.set()
        await go_on.wait()

    backends.refund.before = held
    request = tool_proxy_pb2.InvokeToolRequest(tool=REFUND, idempotency_key="r")
    request.context.workflow_id, request.context.task_id = wf, task
    request.arguments.update(refund_args())
    call = mesh.stub.InvokeTool(request, metadata=((TOKEN_MD, token.token),), timeout=5)
    await entered.wait()
    call.cancel()  # the agent was killed mid-call
    with pytest.raises(asyncio.CancelledError):
        await call
    # One more round trip on the same connection, after the cancellation reached it.
    await health_pb2_grpc.HealthStub(mesh.channel).Check(health_pb2.HealthCheckRequest())
    go_on.set()

    async def replayed() -> bool:
        try:
            response = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r")
        except grpc.aio.AioRpcError as err:
            assert error_details(err).reason == "IDEMPOTENCY_IN_PROGRESS", err
            return False
        assert response.replayed
        return True

    await eventually(replayed)
    assert backends.refund.executions[wf] == 1
    assert len(await effects(mesh, wf)) == 1


class HeldAllow:
    """The proxy's real audit writer, holding one workflow's ``allow`` record until the
    test lets it go (the moment an agent was killed in the chaos suite)."""

    def __init__(self, writer: Any, workflow_id: str) -> None:
        self._writer = writer
        self._workflow_id = workflow_id
        self.entered, self.go_on = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    async def append(self, kind: Any, **fields: Any) -> Any:
        if fields["outcome"] == "allow" and fields["workflow_id"] == self._workflow_id:
            self.entered.set()
            await self.go_on.wait()
        return await self._writer.append(kind, **fields)


async def test_a_call_whose_caller_went_away_after_it_was_allowed_ends_with_its_outcome(
    mesh: Mesh, backends: Backends
) -> None:
    # An agent killed between the call's policy decision and its backend: gRPC cancels
    # the handler of a call whose client died (as kill -9 does in the chaos suite). The
    # `allow` record must never stand alone, and the effect happens once.
    servicer = mesh.proxy.servicer
    assert servicer is not None
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND])
    writer = servicer.recorder.audit
    held = HeldAllow(writer, wf)
    servicer.recorder.audit = held
    invoke_call = servicer.pipeline.invoke
    handlers: list[asyncio.Task[Any]] = []

    async def watched(*args: Any) -> Any:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        return await invoke_call(*args)

    servicer.pipeline.invoke = watched  # type: ignore[method-assign]
    try:
        request = tool_proxy_pb2.InvokeToolRequest(tool=REFUND, idempotency_key="r")
        request.context.workflow_id, request.context.task_id = wf, task
        request.arguments.update(refund_args())
        call = mesh.stub.InvokeTool(request, metadata=((TOKEN_MD, token.token),), timeout=30)
        await held.entered.wait()
        (handler,) = handlers
        handler.cancel()  # what gRPC does when the client's connection dies
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        held.go_on.set()

        async def finished() -> bool:
            await writer.flush()
            outcomes = [r.outcome for r in await audit_records(mesh, wf)]
            return outcomes == ["allow", "executed"]

        await eventually(finished)
    finally:
        held.go_on.set()
        servicer.recorder.audit = writer
        del servicer.pipeline.invoke
    again = await invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="r")
    assert again.replayed
    assert backends.refund.executions[wf] == 1
    assert [r.outcome for r in await audit_records(mesh, wf)] == ["allow", "executed", "replayed"]
