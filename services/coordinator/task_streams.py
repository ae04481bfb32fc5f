"""Task attempts sent to an agent replica over one long-lived ExecuteTasks stream, so a
task costs a message each way instead of a call of its own (call setup, interceptors,
metadata, on both sides).

An attempt's failure comes back as the ``google.rpc.Status`` ExecuteTask would have
failed with; it is raised here as the same ``grpc.aio.AioRpcError`` a unary call raises
(code, message, error details in ``grpc-status-details-bin``), so the runner treats both
paths alike. The stream itself carries no deadline (it lives as long as the replica);
each attempt carries its own timeout, and the caller stops waiting after it. A broken
stream fails its unanswered attempts with UNAVAILABLE (transient: the runner sends them
again, under the same attempt numbers, which the agent deduplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import grpc
import structlog
from google.rpc import status_pb2

from tessera.runtime.telemetry import inject_headers
from tessera.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["StreamUnsupported", "TaskStream", "rpc_error"]

log = structlog.get_logger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"


class StreamUnsupported(Exception):
    """The agent does not implement ExecuteTasks (an agent built without the SDK)."""


def rpc_error(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    """The AioRpcError a unary call failing with ``status`` raises."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((_DETAILS_KEY, status.SerializeToString())),
        details=status.message,
    )


def _failure(code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    return rpc_error(status_pb2.Status(code=code.value[0], message=message))


class TaskStream:
    """One ExecuteTasks stream to one agent replica; :meth:`send` is safe to call from
    many coroutines at once."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        self._call = stub.ExecuteTasks()
        self._pending: dict[int, asyncio.Future[agent_pb2.ExecuteTaskResponse]] = {}
        self._ids = itertools.count(1)
        self._writing = asyncio.Lock()
        self.broken = False
        self.unsupported = False
        self._reader = asyncio.create_task(self._read(), name="task-stream-reader")

    async def send(
        self, request: agent_pb2.ExecuteTaskRequest, timeout_s: float
    ) -> agent_pb2.ExecuteTaskResponse:
        if self.unsupported:
            raise StreamUnsupported
        if self.broken:
            raise _failure(grpc.StatusCode.UNAVAILABLE, "the task stream to the agent broke")
        call_id = next(self._ids)
        answer: asyncio.Future[agent_pb2.ExecuteTaskResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[call_id] = answer
        message = agent_pb2.ExecuteTasksRequest(
            call_id=call_id, task=request, trace_context=inject_headers({})
        )
        message.timeout.FromNanoseconds(int(timeout_s * 1e9))
        try:
            try:
                async with self._writing:
                    await self._call.write(message)
            except Exception as exc:
                self.broken = True
                raise _failure(
                    grpc.StatusCode.UNAVAILABLE, f"cannot send to the agent: {type(exc).__name__}"
                ) from exc
            try:
                return await asyncio.wait_for(answer, timeout_s)
            except TimeoutError:
                raise _failure(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:g}s"
                ) from None
        finally:
            self._pending.pop(call_id, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # retrieved: set by the reader as this call gave up

    async def _read(self) -> None:
        error: BaseException
        try:
            async for response in self._call:
                answer = self._pending.get(response.call_id)
                if answer is None or answer.done():
                    continue  # its caller stopped waiting
                if response.HasField("error"):
                    answer.set_exception(rpc_error(response.error))
                else:
                    answer.set_result(response.response)
            error = _failure(grpc.StatusCode.UNAVAILABLE, "the agent closed the task stream")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.unsupported = True
                error = StreamUnsupported()
            else:
                log.info("task_stream_broke", code=exc.code().name)
                error = _failure(grpc.StatusCode.UNAVAILABLE, "the task stream to the agent broke")
        except asyncio.CancelledError:
            error = _failure(grpc.StatusCode.UNAVAILABLE, "the task stream was closed")
        self.broken = True
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(error)

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
