"""The coordinator's durable core on a real JetStream: a workflow's history appended once
per step and fenced, rebuilt from a snapshot and its tail, listed through its start
entries newest first, and expired after its retention (issue 15)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from services.coordinator.engine import Emitter
from services.coordinator.retention import Retention
from services.coordinator.state import WS, WorkflowRecord
from services.coordinator.store import Conflict, WorkflowStore
from tessera.runtime.bus import Topology, connect, declare
from tessera.v1 import events_pb2, planner_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(params=[False, True], ids=["one-replica", "replicated-reads"])
async def store(
    nats_url: str, namespace: str, request: pytest.FixtureRequest
) -> AsyncIterator[WorkflowStore]:
    """The store as a coordinator uses it; ``replicated`` reads also confirm the last
    entry with the stream's leader (what a 3-node cluster needs)."""
    nc: Client = await connect(nats_url, name="test-workflow-history")
    js = nc.jetstream()
    topology = Topology(namespace)
    await declare(js, topology)
    store = WorkflowStore(js, topology, nc=nc, replicated=request.param)
    await store.open()
    try:
        yield store
    finally:
        await nc.drain()


def _started(wf_id: str, *, template: str = "t", at: float = 1000.0) -> WorkflowRecord:
    rec = WorkflowRecord(id=wf_id)
    plan = planner_pb2.TaskGraph(template=template, tasks=[planner_pb2.TaskSpec(id="a")])
    Emitter(rec, now=at).emit(
        workflow_started=events_pb2.WorkflowStarted(request_id=wf_id, goal="g", plan=plan)
    )
    return rec


def _completed(rec: WorkflowRecord, *, at: float) -> None:
    Emitter(rec, now=at).emit(workflow_completed=events_pb2.WorkflowCompleted())


async def test_one_append_per_step_fenced_against_a_second_writer(store: WorkflowStore) -> None:
    rec = _started("wf-fence")
    revision = await store.create(rec)
    with pytest.raises(Conflict):  # the same start again: the first append is the claim
        await store.create(_started("wf-fence"))

    loaded = await store.load("wf-fence")
    assert loaded is not None
    mine, theirs = loaded[0], (await store.load("wf-fence"))[0]  # type: ignore[index]
    assert loaded[1] == revision
    # Two replicas advance from the same revision: the first append wins, the second is
    # refused (it must reload), and nothing the loser decided is stored.
    _completed(mine, at=1001.0)
    Emitter(theirs, now=1001.0).emit(
        guardrail_tripped=events_pb2.GuardrailTripped(task_id="a", detail="stale")
    )
    await store.save(mine, revision)
    with pytest.raises(Conflict):
        await store.save(theirs, revision)

    rebuilt = await store.load("wf-fence")
    assert rebuilt is not None and rebuilt[0].state == WS.WORKFLOW_STATE_SUCCEEDED
    entries = await store.entries_after("wf-fence", 0)
    assert [len(events_pb2.WorkflowHistoryEntry.FromString(e.data).events) for e in entries] == [
        1,
        1,
    ]  # two steps, two appends
    assert await store.load("wf-nobody") is None


async def test_a_long_history_is_rebuilt_from_its_snapshot_and_tail(store: WorkflowStore) -> None:
    rec = _started("wf-long")
    revision = await store.create(rec)
    for i in range(40):  # the same key rewritten: the history outgrows the state
        Emitter(rec, now=1000.0 + i).emit(
            guardrail_tripped=events_pb2.GuardrailTripped(task_id="a", detail="x" * 4000)
        )
        revision = await store.save(rec, revision)
    snapshot = await store.kv.get("wf.wf-long")
    assert snapshot.value  # written once the history since was twice the state
    rebuilt = await store.load("wf-long")
    assert rebuilt is not None
    assert rebuilt[1] == revision
    assert rebuilt[0].model_dump() == rec.model_dump()


async def test_listing_pages_newest_first_over_the_start_entries(store: WorkflowStore) -> None:
    ids = [f"wf-{i:03d}" for i in range(40)]
    for wf_id in ids:
        rec = _started(wf_id)
        revision = await store.create(rec)
        _completed(rec, at=1001.0)
        await store.save(rec, revision)  # histories interleave with the starts
    seen: list[str] = []
    before: int | None = None
    more = True
    while more:
        page, more = await store.starts_before(before, 7)
        assert len(page) <= 7
        seen += [
            events_pb2.WorkflowHistoryEntry.FromString(m.data).events[0].workflow_id
            for m in reversed(page)
        ]
        if not page:
            break
        before = page[0].seq
    assert seen == list(reversed(ids))


async def test_retention_removes_ended_workflows_only_after_their_time(
    store: WorkflowStore,
) -> None:
    old_done = _started("wf-old-done", at=1000.0)
    revision = await store.create(old_done)
    _completed(old_done, at=1010.0)
    await store.save(old_done, revision)
    await store.create(_started("wf-old-running", at=1000.0))
    recent = _started("wf-recent-done", at=5000.0)
    revision = await store.create(recent)
    _completed(recent, at=5010.0)
    await store.save(recent, revision)

    retention = Retention(store, retention_s=3600.0, interval_s=3600.0)
    assert await retention.sweep(now=1010.0 + 3599.0) == 0  # not yet
    assert await retention.sweep(now=1010.0 + 3601.0) == 1
    assert await store.load("wf-old-done") is None
    assert await store.entries_after("wf-old-done", 0) == []
    assert await store.load("wf-old-running") is not None  # still running: kept
    assert await store.load("wf-recent-done") is not None
    assert await retention.sweep(now=1010.0 + 3601.0) == 0  # idempotent
