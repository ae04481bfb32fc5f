"""Step 9 of InvokeTool: a tool's secret, read from Vault with the caller's own task token,
cached per tool scope for ``secret_cache_ttl_s`` (served only to a token verified and
scoped to it by the earlier steps)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from services.tool_proxy.settings import ToolProxySettings
from services.tool_proxy.tokens import TokenChecker, VerifiedToken
from services.tool_proxy.tools.registry import Tool
from tessera.runtime.errors import FailedPrecondition, Unauthenticated, Unavailable
from tessera.vault.errors import (
    InvalidToken,
    ToolSecretNotFound,
    VaultPermissionDenied,
    VaultUnavailable,
)
from tessera.vault.tokens import TaskToken, ToolSecret

__all__ = ["SecretReader", "ToolSecrets"]


class SecretReader(Protocol):
    async def read_tool_secret(self, tool: str, *, token: str) -> ToolSecret: ...


class CallTokenMinter(Protocol):
    """How the proxy gets a token for a person's call (no task token exists): a child
    token through the ``tessera-task`` role, one use, scoped to the tool's secret."""

    async def create_task_token(
        self, *, tools: Sequence[str], ttl_s: int, num_uses: int, meta: Mapping[str, str]
    ) -> TaskToken: ...


class ToolSecrets:
    def __init__(
        self, *, settings: ToolProxySettings, vault: SecretReader, tokens: TokenChecker
    ) -> None:
        self.settings = settings
        self.vault = vault
        self.tokens = tokens
        self._cache: dict[str, tuple[ToolSecret, float]] = {}

    def _cached(self, scope: str, now: float) -> ToolSecret | None:
        cached = self._cache.get(scope)
        ttl = self.settings.secret_cache_ttl_s
        if cached is not None and ttl > 0 and now - cached[1] < ttl:
            return cached[0]
        return None

    async def get(self, tool: Tool, token: str, verified: VerifiedToken) -> ToolSecret:
        """The tool's secret; from the cache only for a token verified and scoped above."""
        scope = tool.spec.scope
        now = time.monotonic()
        cached = self._cached(scope, now)
        if cached is not None:
            return cached
        try:
            secret = await self.vault.read_tool_secret(scope, token=token)
        except (VaultPermissionDenied, InvalidToken):
            # Scoped per the lookup, refused by Vault: revoked or used up since.
            self.tokens.evict_accessors([verified.info.accessor])
            raise Unauthenticated("Vault refused the task token", reason="TOKEN_INVALID") from None
        except (ToolSecretNotFound, VaultUnavailable) as exc:
            raise _refusal(tool, exc) from None
        self._keep(scope, secret, now)
        return secret

    async def get_for_person(
        self, tool: Tool, minter: CallTokenMinter, *, person: str, call_id: str
    ) -> ToolSecret:
        """The tool's secret for a person's call the policy allowed: cached like an
        agent's, else read with a token minted for this call alone (one use, a minute,
        Vault policy = this tool's secret only; its meta names the person)."""
        scope = tool.spec.scope
        now = time.monotonic()
        cached = self._cached(scope, now)
        if cached is not None:
            return cached
        try:
            token = await minter.create_task_token(
                tools=[scope],
                ttl_s=60,
                num_uses=1,
                meta={"workflow": "people", "task": call_id, "agent": "", "person": person},
            )
            secret = await self.vault.read_tool_secret(scope, token=token.token)
        except (VaultPermissionDenied, InvalidToken):
            raise FailedPrecondition(
                f"Vault refused the secret of {tool.spec.name!r} for a person's call",
                reason="TOOL_SECRET_REFUSED",
                metadata={"tool": tool.spec.name},
            ) from None
        except (ToolSecretNotFound, VaultUnavailable) as exc:
            raise _refusal(tool, exc) from None
        self._keep(scope, secret, now)
        return secret

    def _keep(self, scope: str, secret: ToolSecret, now: float) -> None:
        if self.settings.secret_cache_ttl_s > 0:
            previous = self._cache.get(scope)
            if previous is None or previous[0].version <= secret.version:
                self._cache[scope] = (secret, now)


def _refusal(
    tool: Tool, exc: ToolSecretNotFound | VaultUnavailable
) -> FailedPrecondition | Unavailable:
    """What a caller hears when the secret is missing or Vault is away (never Vault's words)."""
    if isinstance(exc, ToolSecretNotFound):
        return FailedPrecondition(
            f"no secret is stored for {tool.spec.name!r}", reason="TOOL_SECRET_MISSING"
        )
    return Unavailable(
        "Vault unreachable: cannot read the tool secret",
        reason="VAULT_UNAVAILABLE",
        retry_after_s=1.0,
    )
