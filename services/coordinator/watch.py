"""Following one workflow's history live (WatchWorkflow), without creating anything on the
server: a core NATS subscription to the workflow's subjects, opened before the history so
far is read (batched direct gets), so no entry can fall in between.

Event sequences are consecutive, so an entry the subscription missed (a slow subscriber)
shows as a gap, and the history is read again from where it was last read. A quiet
workflow is checked every ``RECHECK_S`` (one get of its last entry) for the same reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from services.coordinator.state import WorkflowRecord, apply_event
from services.coordinator.store import WorkflowStore
from tessera.runtime.errors import NotFound
from tessera.runtime.history import TERMINAL_EVENTS, entry_events
from tessera.v1 import events_pb2

__all__ = ["RECHECK_S", "follow"]

RECHECK_S = 5.0


def _started(wf_id: str, start_entry: bytes) -> WorkflowRecord:
    """A workflow as its first entry describes it (who started it, from what template):
    what reading it is authorized on."""
    rec = WorkflowRecord(id=wf_id)
    for event in entry_events(start_entry):
        apply_event(rec, event)
    return rec


async def follow(
    store: WorkflowStore,
    wf_id: str,
    *,
    start: int,
    authorize: Callable[[WorkflowRecord], Awaitable[None]],
) -> AsyncIterator[events_pb2.WorkflowEvent]:
    """Every event of ``wf_id`` from sequence ``start`` until its terminal one. Raises
    NotFound for a workflow that does not exist, and whatever ``authorize`` raises for
    the workflow as its start entry describes it, before anything is sent."""
    sub = await store.nc.subscribe(store.topology.wf_history_subjects(wf_id))
    try:
        read_to, seen, reread = 0, 0, True
        while True:
            if reread:
                stored = await store.entries_after(wf_id, read_to)
                if read_to == 0:
                    if not stored:
                        raise NotFound(
                            f"workflows/{wf_id} does not exist",
                            reason="WORKFLOW_NOT_FOUND",
                            metadata={"workflow": f"workflows/{wf_id}"},
                        )
                    await authorize(_started(wf_id, stored[0].data))
                read_to = stored[-1].seq if stored else read_to
                batches = [m.data for m in stored]
            else:
                try:
                    msg = await sub.next_msg(timeout=RECHECK_S)
                except TimeoutError:
                    last = await store.last_event(wf_id)
                    reread = last is not None and last.sequence > seen
                    continue
                batches = [msg.data]
            reread = False
            for data in batches:
                events = entry_events(data)
                if events and events[0].sequence > seen + 1:
                    reread = True  # a gap: read the history again before going on
                    break
                for event in events:
                    if event.sequence <= seen:
                        continue
                    seen = event.sequence
                    if event.sequence < start:
                        continue
                    yield event
                    if event.WhichOneof("kind") in TERMINAL_EVENTS:
                        return
    finally:
        await sub.unsubscribe()
