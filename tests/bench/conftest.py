"""Benchmarks: every test here carries the `bench` marker (`make bench` selects them with
`-m bench`). The full run is also `slow`, so `make test` (addopts `-m 'not slow'`) runs
only the bounded smoke variant."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "bench" in item.path.parts:
            item.add_marker(pytest.mark.bench)
