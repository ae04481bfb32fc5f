"""How Tessera names things in Vault/OpenBao.

One place for the mapping from a tool name (``billing.issue_refund``) to its policy
(``tool-billing-issue_refund``) and secret path (``tool-secrets/data/billing-issue_refund``),
shared by the bootstrap, the coordinator and the tool proxy.
"""

from __future__ import annotations

import re

__all__ = [
    "AGENT_PREFIX",
    "APPROLE_MOUNT",
    "LOCAL_PROXY_SOURCE",
    "TASK_TOKEN_ROLE",
    "TOOL_POLICY_PREFIX",
    "TOOL_SECRETS_MOUNT",
    "agent_identity",
    "is_valid_identity_name",
    "is_valid_tool_name",
    "tool_policy_name",
    "tool_slug",
]

TOOL_SECRETS_MOUNT = "tool-secrets"
"""KV v2 mount holding one secret per tool."""

APPROLE_MOUNT = "approle"
"""Auth mount the services log in through."""

TASK_TOKEN_ROLE = "tessera-task"
"""Token role the coordinator creates task tokens through."""

TOOL_POLICY_PREFIX = "tool-"
AGENT_PREFIX = "agent-"

_TOOL_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_IDENTITY_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def is_valid_tool_name(tool: str) -> bool:
    """True for dotted lower-case names such as ``crm.lookup_customer``."""
    return _TOOL_RE.fullmatch(tool) is not None


def is_valid_identity_name(name: str) -> bool:
    """True for lower-case kebab-case names such as ``tool-proxy``."""
    return _IDENTITY_RE.fullmatch(name) is not None


def tool_slug(tool: str) -> str:
    """``billing.issue_refund`` -> ``billing-issue_refund`` (the KV key of its secret).

    Tool names never contain '-', so the mapping is injective.

    Raises:
        ValueError: the name is not a valid tool name.
    """
    if not is_valid_tool_name(tool):
        raise ValueError(f"invalid tool name {tool!r}: expected e.g. 'crm.lookup_customer'")
    return tool.replace(".", "-")


def tool_policy_name(tool: str) -> str:
    """``billing.issue_refund`` -> ``tool-billing-issue_refund``."""
    return TOOL_POLICY_PREFIX + tool_slug(tool)


def agent_identity(agent: str) -> str:
    """``triage`` -> ``agent-triage``: the agent's AppRole role, policy and identity name."""
    if not is_valid_identity_name(agent):
        raise ValueError(f"invalid agent name {agent!r}: expected lower-case kebab-case")
    return AGENT_PREFIX + agent


LOCAL_PROXY_SOURCE = "127.0.0.2"
"""The loopback address a local tool proxy reaches Vault from; vault/tools.yaml binds task
tokens to it (``bound_cidrs``), so on one machine only the proxy can use a task token."""
