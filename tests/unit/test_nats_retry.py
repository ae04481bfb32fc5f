"""Which NATS faults a retry gets past (tessera.runtime.retry), and that the retry is
bounded in time."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import errors as js_errors

from tessera.runtime.retry import is_transient_nats_error, retry_transient


def _api_error(code: int, err_code: int) -> js_errors.APIError:
    return js_errors.APIError(code=code, err_code=err_code, description="test")


def test_a_publish_racing_its_own_duplicate_is_retried() -> None:
    # A clustered stream still storing the same message id: retried, it is a duplicate ack.
    assert is_transient_nats_error(_api_error(409, 10158))
    assert is_transient_nats_error(_api_error(503, 10008))


def test_answers_are_not_retried() -> None:
    assert not is_transient_nats_error(_api_error(400, 10071))  # wrong last sequence
    assert not is_transient_nats_error(_api_error(404, 10037))  # no message found
    assert not is_transient_nats_error(ValueError("bad input"))


async def test_retry_transient_gets_past_a_duplicate_in_process() -> None:
    calls = 0

    async def publish() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise _api_error(409, 10158)
        return "ack"

    assert await retry_transient(publish, within_s=5.0, what="test", base_s=0.001) == "ack"
    assert calls == 3


async def test_retry_transient_gives_up_at_its_bound() -> None:
    async def never() -> None:
        raise _api_error(503, 10008)

    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(js_errors.APIError):
        await retry_transient(never, within_s=0.2, what="test", base_s=0.01, max_s=0.05)
    assert loop.time() - began < 2.0  # bounded by within_s, not by a count
