"""Bounded smoke of the Restate side (about 10 s): the server and the service up on
loopback, the deployment registered, 1.5 s of the closed loop at concurrency 4 through
the ingress. Skips when `make restate-server` has not installed the server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.bench.restate_side import SERVER_BIN, RestateSide, restate_run

pytestmark = pytest.mark.skipif(
    not SERVER_BIN.exists(), reason="restate-server not installed: make restate-server"
)


async def test_restate_side_bounded(tmp_path: Path) -> None:
    # Bounded here (no pytest-timeout): a hung start or driver fails the test, not CI.
    async with asyncio.timeout(40), RestateSide(tmp_path / "restate") as side:
        report = await restate_run(side, 4, warmup=0.5, duration=1.5)
    report.pop("latencies_s", None)
    print(json.dumps(report))
    assert report["completed"] > 0
    assert set(report["outcomes"]) == {"workflow_completed"}, report["outcomes"]
    assert set(report["cpu_ms_per_wf"]) == {"restate-server", "restate-service", "client"}
