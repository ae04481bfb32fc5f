"""Start-up waits: a dependency that is not ready yet delays a start, boundedly."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.js.errors import BadRequestError, NoStreamResponseError, ServiceUnavailableError

from tessera.runtime.startup import NotReadyYet, not_ready_yet, until_ready


class Flaky:
    """Fails with each of ``faults`` in turn, then answers ``"ready"``."""

    def __init__(self, *faults: Exception) -> None:
        self.faults = list(faults)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)
        return "ready"


async def test_a_forming_cluster_is_waited_out() -> None:
    """What JetStream answers while a cluster forms and leaders are elected: retried."""
    call = Flaky(
        nats.errors.TimeoutError(),  # no meta leader yet: the API request is not answered
        ServiceUnavailableError(code=503, description="JetStream system temporarily unavailable"),
        BadRequestError(code=400, err_code=10005, description="no suitable peers"),
        NoStreamResponseError(),  # a KV put before the bucket's stream has a leader
        NotReadyYet("stream has no leader yet"),
        ConnectionRefusedError(),  # the server is not listening yet
    )
    assert await until_ready(call, what="declare", within_s=10) == "ready"
    assert call.calls == 7


async def test_an_answer_that_is_not_about_readiness_propagates_at_once() -> None:
    call = Flaky(BadRequestError(code=400, err_code=10058, description="name in use"))
    with pytest.raises(BadRequestError):
        await until_ready(call, what="declare", within_s=10)
    assert call.calls == 1


async def test_a_dependency_that_stays_unready_fails_the_start_after_the_bound() -> None:
    async def never() -> None:
        raise ServiceUnavailableError(code=503, description="JetStream not ready")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ServiceUnavailableError):
        await until_ready(never, what="declare", within_s=0.3)
    assert loop.time() - started < 2


async def test_an_attempt_that_hangs_is_cut_at_the_bound() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError, match=r"vault login: not ready within 0\.2s"):
        await until_ready(hangs, what="vault login", within_s=0.2)


async def test_a_caller_chooses_what_counts_as_not_ready() -> None:
    class Down(Exception):
        pass

    call = Flaky(Down(), Down())
    assert await until_ready(call, what="x", retry_if=lambda e: isinstance(e, Down)) == "ready"
    assert not not_ready_yet(Down())


async def test_an_unanswered_attempt_is_asked_again() -> None:
    """A request a busy cluster drops is cut after ``attempt_s`` and sent again."""
    calls = 0

    async def answers_the_second_time() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()
        return "ready"

    assert await until_ready(answers_the_second_time, what="x", attempt_s=0.1) == "ready"
    assert calls == 2
