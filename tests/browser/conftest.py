"""The review console in a real browser: Debian's chromium driven by Playwright, against
the whole mesh as `tessera up` runs it (one mesh per module).

Without a chromium the tests are skipped with the reason, except where
``TESSERA_REQUIRE_BROWSER=1`` (CI: `.ci/run` installs the package and sets it), where a
missing browser fails the run instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_mesh_up import tessera

CLOCK_SKEW_S = 1
"""The test mesh's leeway on token expiry (the default 30 s would make the expiry story
wait half a minute)."""


def chromium_executable() -> str | None:
    found = os.environ.get("TESSERA_CHROMIUM") or shutil.which("chromium")
    return found if found and Path(found).exists() else None


@pytest.fixture(scope="session")
def chromium() -> str:
    found = chromium_executable()
    if found is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("TESSERA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@dataclass(frozen=True)
class ConsoleMesh:
    data_dir: Path
    gateway: str

    @property
    def url(self) -> str:
        return f"http://{self.gateway}/console/"

    def password(self, user: str) -> str:
        return (self.data_dir / "secrets" / "humans" / f"{user}.password").read_text().strip()


@pytest.fixture(scope="module")
def console_mesh(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[ConsoleMesh]:
    data_dir = tmp_path_factory.mktemp("console")
    up = tessera(
        "up", data_dir=data_dir, env={"TESSERA_GATEWAY_JWT_CLOCK_SKEW_S": str(CLOCK_SKEW_S)}
    )
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((data_dir / "state.json").read_text())
        mesh = ConsoleMesh(data_dir, str(state["gateway"]))
        assert mesh.url in up.stdout.replace("\n", ""), up.stdout  # `up` says where it is
        yield mesh
    finally:
        tessera("down", data_dir=data_dir)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # As root (CI), chromium refuses its sandbox; the pages are our own.
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()
