"""Durable timers: steps on the work stream's ``timer`` subject wake a workflow at a time
(today: a gate's expiry, services/coordinator/engine.py ``_expire_gates``).

A timer step is a ``WorkStep`` whose ``not_before`` says when. The replicas share one
durable consumer of the timer subject: a step fetched early is handed back with a
negative acknowledgement delayed until it is due, so JetStream, not a replica's memory,
holds it meanwhile (a restart or a dead replica loses no timer). A due step is queued as
an "advance" step and acknowledged. Timers live on their own consumer so that they never
count as running work for admission control (admission.py reads the advance consumer).

A timer that fires after its reason went away (the gate was decided) only queues an
advance step that finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.errors import FetchTimeoutError

from services.coordinator.store import TIMER, WorkflowStore
from tessera.v1 import events_pb2

log = structlog.get_logger(__name__)

DURABLE = "coordinator-timers"
# A fetched timer is acknowledged or handed back within milliseconds; this only bounds
# how long one fetched by a replica that died at that moment stays invisible.
_ACK_WAIT_S = 5.0
# A due timer whose advance step could not be queued (NATS electing) is retried then.
_RETRY_S = 1.0


class Timers:
    def __init__(self, store: WorkflowStore) -> None:
        self.store = store
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.store.work_consumer(DURABLE, TIMER, ack_wait_s=_ACK_WAIT_S)
        self._task = asyncio.create_task(self._consume(), name="coordinator-timers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def _consume(self) -> None:
        while True:
            try:
                msgs = await self._sub.fetch(batch=64, timeout=1.0)
            except (TimeoutError, FetchTimeoutError):
                continue
            except Exception as exc:  # a NATS outage: back off, the client reconnects
                log.warning("timer_fetch_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._fire(msg)

    async def _fire(self, msg: Msg) -> None:
        try:
            step = events_pb2.WorkStep.FromString(msg.data)
        except DecodeError:
            log.error("timer_step_unreadable", subject=msg.subject)
            await msg.term()  # only the coordinator publishes here: nothing to retry
            return
        due = step.not_before.ToMicroseconds() / 1e6
        left = due - time.time()
        try:
            if left > 0:
                await msg.nak(delay=left)
                return
            await self.store.enqueue(step.workflow_id, step.reason or "timer", within_s=2.0)
            await msg.ack()
        except Exception as exc:
            log.warning("timer_step_failed", workflow_id=step.workflow_id, error=repr(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=_RETRY_S)
