"""Settings of an agent process."""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings

__all__ = ["AgentSettings"]


def _env_token(agent_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", agent_name).upper()


class AgentSettings(ServiceSettings):
    """An agent replica's settings.

    Shared infrastructure comes from the fixed ``TESSERA_NATS_URL``, ``TESSERA_NAMESPACE``…;
    server fields from ``TESSERA_AGENT_<NAME>_*`` (``NAME`` upper-cased, ``-`` → ``_``)
    when built with :meth:`for_agent`; ``listen`` falls back to ``TESSERA_AGENT_LISTEN``
    and then to ``127.0.0.1:0``.
    """

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_AGENT_", extra="ignore", populate_by_name=True
    )

    advertise: str = ""
    """``host:port`` to publish in the registry instead of the bound address (containers)."""
    dedup_entries: int = Field(default=10_000, ge=1)
    """Completed task attempts remembered for idempotent replays."""
    heartbeat_interval_s: float | None = Field(default=None, gt=0)
    """Registry heartbeat period; ``None``: a third of the registry TTL."""

    @classmethod
    def for_agent(cls, agent_name: str, **overrides: Any) -> AgentSettings:
        """Settings read from the environment for agent ``agent_name``; ``overrides``
        (field names) win over the environment."""
        prefix = f"TESSERA_AGENT_{_env_token(agent_name)}_"

        class _PerAgent(cls):  # type: ignore[valid-type,misc]
            model_config = SettingsConfigDict(
                env_prefix=prefix, extra="ignore", populate_by_name=True
            )
            listen: str = Field(
                default="127.0.0.1:0",
                validation_alias=AliasChoices(f"{prefix}LISTEN", "TESSERA_AGENT_LISTEN", "listen"),
            )

        settings: AgentSettings = _PerAgent(**overrides)
        return settings
