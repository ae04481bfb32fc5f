"""The identity token issuer's public keys, kept current for Envoy's jwt_authn.

Envoy gets the keys inline in its listener (``local_jwks``), so every Envoy verifies
against exactly what this control plane last fetched, and a key rotation at the issuer
reaches them as one ADS update within ``refresh_s``. A fetch that fails keeps the last
good keys (tokens keep verifying through a short issuer outage; new keys wait). Before
the first good fetch there are no keys and no token verifies: the front door fails
closed.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable

import structlog

__all__ = ["JwksFetchFailed", "JwksFollower", "fetch_jwks"]

log = structlog.get_logger(__name__)

_MAX_JWKS_BYTES = 256 * 1024
_MAX_KEYS = 64


class JwksFetchFailed(Exception):
    """The issuer's key set could not be fetched or is not a JWKS."""


def _get(url: str, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    with urllib.request.urlopen(
        request, timeout=timeout_s
    ) as response:  # http(s) only: checked by fetch_jwks
        body: bytes = response.read(_MAX_JWKS_BYTES + 1)
    return body


async def fetch_jwks(url: str, *, timeout_s: float = 5.0) -> str:
    """The key set at ``url`` as canonical JSON text (so equal sets compare equal)."""
    if not url.startswith(("http://", "https://")):
        raise JwksFetchFailed(f"JWKS URL must be http(s): {url!r}")
    try:
        body = await asyncio.wait_for(asyncio.to_thread(_get, url, timeout_s), timeout_s + 1)
    except (OSError, urllib.error.URLError, TimeoutError) as exc:
        raise JwksFetchFailed(f"cannot fetch {url}: {exc}") from exc
    if len(body) > _MAX_JWKS_BYTES:
        raise JwksFetchFailed(f"{url} answered more than {_MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise JwksFetchFailed(f"{url} did not answer JSON") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > _MAX_KEYS:
        raise JwksFetchFailed(f"{url} answered no usable key set")
    return json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":"))


class JwksFollower:
    """Re-fetches every ``refresh_s``; calls ``on_change`` when the key set changed."""

    def __init__(self, url: str, *, refresh_s: float, on_change: Callable[[], None]) -> None:
        self.url = url
        self.refresh_s = refresh_s
        self._on_change = on_change
        self.current: str = ""

    async def first(self, *, within_s: float) -> None:
        """Fetch until the first success or ``within_s`` (then raise the last failure)."""
        deadline = asyncio.get_running_loop().time() + within_s
        delay = 0.05
        while True:
            try:
                self.current = await fetch_jwks(self.url)
                return
            except JwksFetchFailed:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                fresh = await fetch_jwks(self.url)
            except JwksFetchFailed as exc:
                log.warning("jwks_refresh_failed", url=self.url, error=str(exc))
                continue
            if fresh != self.current:
                self.current = fresh
                log.info("jwks_changed", url=self.url)
                self._on_change()
