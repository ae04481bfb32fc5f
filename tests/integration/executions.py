"""What the coordinator records about task attempts, followed live from the workflow
events stream: which replica each dispatch went to and which replica's output was
accepted. (Agents publish nothing on NATS; these facts are the coordinator's.)"""

from __future__ import annotations

import asyncio
from collections import Counter

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tessera.runtime.bus import Topology
from tessera.runtime.history import entry_events
from tessera.v1 import events_pb2


class Executions:
    """``dispatches``: sends per (workflow, task, attempt); ``by_instance``: accepted
    outputs per agent replica; ``failures``: TaskFailed events seen."""

    def __init__(self) -> None:
        self.dispatches: Counter[tuple[str, str, int]] = Counter()
        self.by_instance: Counter[str] = Counter()
        self.failures = 0
        self._event_ids: set[str] = set()
        self._arrived = asyncio.Event()
        self._subscription: Subscription | None = None

    async def follow(self, nc: Client, namespace: str) -> None:
        subject = Topology(namespace).wf_events_subjects
        self._subscription = await nc.subscribe(subject, cb=self._on_message)

    async def _on_message(self, msg: Msg) -> None:
        for event in entry_events(msg.data):
            self._count(event)
        self._arrived.set()

    def _count(self, event: events_pb2.WorkflowEvent) -> None:
        if event.event_id in self._event_ids:
            return  # a history is never rewritten; should it be, count an event once
        self._event_ids.add(event.event_id)
        kind = event.WhichOneof("kind")
        if kind == "task_dispatched":
            d = event.task_dispatched
            self.dispatches[(event.workflow_id, d.task_id, d.attempt)] += 1
        elif kind == "task_succeeded":
            self.by_instance[event.task_succeeded.agent_instance] += 1
        elif kind == "task_failed":
            self.failures += 1

    async def served_by(self, instance_id: str) -> None:
        """Wait until an output of replica ``instance_id`` has been accepted."""
        while self.by_instance[instance_id] == 0:
            self._arrived.clear()
            await self._arrived.wait()
