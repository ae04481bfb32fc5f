"""Keeping one agent replica in the registry, over gRPC (RegistryService).

The agent holds no NATS credentials: it registers at start, re-registers (the heartbeat)
at the interval the registry answers with, and deregisters on a graceful stop. The
registry writes the entry under the name of the agent's certificate, with its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog

from tessera.runtime.startup import until_ready
from tessera.v1 import agent_pb2, registry_pb2, registry_pb2_grpc

__all__ = ["Registration"]

log = structlog.get_logger(__name__)

CALL_TIMEOUT_S = 5.0
"""Deadline of one Register/Deregister call."""
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


def _passes(exc: BaseException) -> bool:
    """A registry restarting or a NATS hiccup behind it: wait it out. Refusals
    (PERMISSION_DENIED, INVALID_ARGUMENT) are final."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRYABLE


class Registration:
    """``await start()`` registers (retrying passing faults for ``register_within_s``,
    then raising); the heartbeat runs until ``await stop()``, which deregisters."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        descriptor: agent_pb2.AgentDescriptor,
        *,
        interval_s: float | None = None,
        register_within_s: float,
    ) -> None:
        """``interval_s``: heartbeat period; ``None`` follows the registry's answer."""
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.descriptor = descriptor
        self._interval_s = interval_s
        self._register_within_s = register_within_s
        self._task: asyncio.Task[None] | None = None
        self.interval_s: float = interval_s or 1.0

    async def _register(self) -> registry_pb2.RegisterResponse:
        response: registry_pb2.RegisterResponse = await self._stub.Register(
            registry_pb2.RegisterRequest(agent=self.descriptor), timeout=CALL_TIMEOUT_S
        )
        if self._interval_s is None and response.heartbeat_interval.ToMilliseconds() > 0:
            self.interval_s = response.heartbeat_interval.ToMilliseconds() / 1000
        return response

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("registration already started")
        await until_ready(
            self._register,
            what="registry registration",
            within_s=self._register_within_s,
            retry_if=_passes,
        )
        self._task = asyncio.create_task(
            self._beat(), name=f"heartbeat-{self.descriptor.name}-{self.descriptor.instance_id}"
        )
        log.info(
            "agent_registered",
            agent=self.descriptor.name,
            instance_id=self.descriptor.instance_id,
            endpoint=self.descriptor.endpoint,
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._register()
            except Exception as exc:  # keep beating through a registry restart
                log.warning(
                    "heartbeat_failed",
                    agent=self.descriptor.name,
                    instance_id=self.descriptor.instance_id,
                    error=repr(exc),
                )

    async def stop(self) -> None:
        """Stop beating and deregister. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await self._stub.Deregister(
                registry_pb2.DeregisterRequest(
                    name=self.descriptor.name, instance_id=self.descriptor.instance_id
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except Exception as exc:
            # The entry then ages out after its lease; readers already ignore it by then.
            log.warning(
                "deregister_failed",
                agent=self.descriptor.name,
                instance_id=self.descriptor.instance_id,
                error=repr(exc),
            )
            return
        log.info(
            "agent_deregistered",
            agent=self.descriptor.name,
            instance_id=self.descriptor.instance_id,
        )
