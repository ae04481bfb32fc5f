"""What the stories do in the console, as a person would, and what they check on the
server behind it (workflows through the real CLI and client, effects in the tools'
outbox, decisions in the audit trail)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from playwright.sync_api import Browser, BrowserContext, Page, expect

from services.tool_proxy.tools.builtin import REFUND
from tessera.cli._local import nats_options
from tessera.cli.login import ensure_login
from tessera.client import MeshClient
from tessera.runtime.bus import Topology, connect
from tessera.v1 import coordinator_pb2
from tests.browser.conftest import ConsoleMesh
from tests.end_of_run import read_effects
from tests.integration.test_mesh_up import CLI_TIMEOUT_S, PROJECT_ROOT

T = TypeVar("T")
WAIT_MS = 90_000
"""How long a page may take to show what a workflow did (generous: a busy machine)."""
SCREENSHOTS = os.environ.get("TESSERA_SCREENSHOTS_DIR")
"""Where `make screenshots` wants the main pages (unset: none taken)."""


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine to its end. Playwright's sync API keeps an event loop
    running in this thread, so the mesh's asyncio clients get a thread of their own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def cli(mesh: ConsoleMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        cwd=PROJECT_ROOT,
        env={**os.environ, "TESSERA_DATA_DIR": str(mesh.data_dir), "COLUMNS": "200"},
    )


def start(mesh: ConsoleMesh, goal: str, inputs: dict[str, Any], *, by: str = "requester") -> str:
    """Start a workflow as ``by`` through the front door; its name."""

    async def run() -> str:
        token = ensure_login(mesh.data_dir, by).token
        async with MeshClient(mesh.gateway, token=token) as client:
            workflow = await client.start(goal, **inputs)
            return str(workflow.name)

    return _run(run())


def workflow(mesh: ConsoleMesh, name: str, *, by: str = "requester") -> coordinator_pb2.Workflow:
    async def get() -> coordinator_pb2.Workflow:
        token = ensure_login(mesh.data_dir, by).token
        async with MeshClient(mesh.gateway, token=token) as client:
            return await client.get(name)

    return _run(get())


def wait_for_gate(mesh: ConsoleMesh, name: str, *, by: str = "requester") -> str:
    """The name of the gate ``name`` parks on (waits on its event stream, not a clock)."""

    async def first_gate() -> str:
        token = ensure_login(mesh.data_dir, by).token
        async with MeshClient(mesh.gateway, token=token) as client:
            async for event in client.watch(name):
                if event.HasField("gate_opened"):
                    return f"{name}/gates/{event.gate_opened.gate_id}"
        raise AssertionError(f"{name} ended without opening a gate")

    return _run(asyncio.wait_for(first_gate(), WAIT_MS / 1000))


def refunds(mesh: ConsoleMesh, workflow_id: str) -> int:
    """Refunds the billing tool made for the workflow, counted in the tools' outbox."""

    async def count() -> int:
        nc = await connect(
            _nats_url(mesh), name="browser-story-checks", **nats_options(mesh.data_dir)
        )
        try:
            effects = await read_effects(nc.jetstream(), Topology("tessera"), {workflow_id})
        finally:
            await nc.close()
        return sum(1 for e in effects if e["tool"] == REFUND)

    return _run(count())


def _nats_url(mesh: ConsoleMesh) -> str:
    from tessera.cli._local import nats_url

    return nats_url("nats://127.0.0.1:4222", mesh.data_dir)


def audit_lines(mesh: ConsoleMesh, needle: str) -> list[str]:
    trail = cli(mesh, "audit", "tail", "-n", "2000")
    assert trail.returncode == 0, trail.stderr
    return [line for line in trail.stdout.splitlines() if needle in line]


def decided_in_audit(mesh: ConsoleMesh, gate: str) -> tuple[str, str]:
    """(decision, by whom) of ``gate`` in the verified audit trail's gate decisions."""
    verify = cli(mesh, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    rows = [line for line in verify.stdout.splitlines() if gate in line]
    assert rows, verify.stdout[-3000:]
    cells = [cell.strip() for cell in rows[-1].split("│") if cell.strip()]
    return cells[1], cells[2]


def new_page(browser: Browser) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    return context, context.new_page()


def log_in(page: Page, mesh: ConsoleMesh, user: str) -> None:
    page.goto(mesh.url)
    page.locator("#user").fill(user)
    page.locator("#password").fill(mesh.password(user))
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_test_id("whoami")).to_have_text(user, timeout=WAIT_MS)


def gate_article(page: Page, gate: str) -> Any:
    return page.locator(f'article[data-testid="gate"][data-gate="{gate}"]')


def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)
