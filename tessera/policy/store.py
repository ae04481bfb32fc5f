"""The policy set being served, its reloads (RPC and file polling) and the last error.

Swapping the set is one reference assignment, so a decision always sees one whole set
(old or new, never a mix). A refused reload leaves the serving set untouched.

Shared by the policy service and the tool proxy's embedded decision point
(``TESSERA_TOOL_PROXY_POLICY_MODE=embedded``), so both load, validate and hot-reload one way.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog

from tessera.policy.engine import (
    LoadedPolicySet,
    PolicyLoadError,
    fingerprint,
    load_policy_dir,
)

log = structlog.get_logger(__name__)


class PolicyStore:
    def __init__(self, policy_dir: Path, *, poll_interval_s: float = 1.0) -> None:
        self.policy_dir = policy_dir
        self._poll_interval_s = poll_interval_s
        self._current: LoadedPolicySet | None = None
        self.last_error: str = ""
        """Why the last reload was refused ("" if it succeeded)."""
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def current(self) -> LoadedPolicySet:
        if self._current is None:
            raise RuntimeError("policy store not loaded")
        return self._current

    async def reload(self) -> LoadedPolicySet:
        """Load and validate the directory; serve it if valid. Raises PolicyLoadError (and
        keeps serving the previous set) otherwise."""
        async with self._reload_lock:
            try:
                loaded = await asyncio.to_thread(load_policy_dir, self.policy_dir)
            except PolicyLoadError as exc:
                self.last_error = str(exc)
                log.error(
                    "policy_reload_refused",
                    errors=[f"{s}: {d}" for s, d in exc.errors],
                    serving=self._current.version if self._current else None,
                )
                raise
            previous = self._current.version if self._current else None
            self._current = loaded
            self.last_error = ""
            if previous != loaded.version:
                log.info(
                    "policy_set_loaded",
                    version=loaded.version,
                    previous=previous,
                    policies=len(loaded.policies),
                )
            return loaded

    async def start(self) -> LoadedPolicySet:
        """First load (raises if invalid: nothing to serve), then poll for changes."""
        loaded = await self.reload()
        self._watcher = asyncio.create_task(self._watch(), name="policy-watcher")
        return loaded

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        seen = self.current.fingerprint
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                now = await asyncio.to_thread(fingerprint, self.policy_dir)
            except OSError as exc:
                log.warning("policy_poll_failed", error=repr(exc))
                continue
            if now == seen:
                continue
            seen = now
            # An editor may still be writing: a refused set is retried at the next change.
            with contextlib.suppress(PolicyLoadError):
                await self.reload()
