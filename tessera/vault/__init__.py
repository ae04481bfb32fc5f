"""Tessera's Vault/OpenBao integration.

- :mod:`tessera.vault.bootstrap`: apply ``vault/`` (policies, AppRoles, token role, mounts).
- :class:`VaultClient`: a service's AppRole-authenticated, self-renewing client: task tokens
  for the coordinator, token lookups and caller-token secret reads for the tool proxy.
- :mod:`tessera.vault.naming`: tool name -> policy / secret path.
"""

from tessera.vault.client import VaultClient
from tessera.vault.errors import (
    InvalidToken,
    ToolSecretNotFound,
    VaultConfigError,
    VaultError,
    VaultPermissionDenied,
    VaultUnavailable,
)
from tessera.vault.naming import tool_policy_name, tool_slug
from tessera.vault.tokens import TaskToken, TokenInfo, ToolSecret

__all__ = [
    "InvalidToken",
    "TaskToken",
    "TokenInfo",
    "ToolSecret",
    "ToolSecretNotFound",
    "VaultClient",
    "VaultConfigError",
    "VaultError",
    "VaultPermissionDenied",
    "VaultUnavailable",
    "tool_policy_name",
    "tool_slug",
]
