"""External A2A agents declared as the implementation of capability contracts.

One declaration file, read by the tool proxy (each agent becomes the governed tool
``a2a.<name>``), by the A2A bridge agent (which registers each declared capability and
serves it by calling that tool) and by the launcher and the Vault bootstrap (the bridge
is started, and each tool gets its Vault scope, only when the file declares an agent).
Its path is ``TESSERA_A2A_AGENTS_FILE``; unset or empty, the feature is off::

    agents:
      - name: quoter                       # [a-z][a-z0-9_]*: the tool is a2a.quoter
        url: https://quoter.example.com    # where its agent card is served
                                           # (<url>/.well-known/agent-card.json)
        timeout_s: 10                      # the A2A exchange's bound (the task gets +1 s)
        side_effect: idempotent_write      # read_only | idempotent_write | external_action
        capability:                        # the contract the bridge registers
          name: pricing.quote
          version: 1.0.0
          description: Price a list of items.
          reads: []                        # blackboard keys sent along with the input
          writes: [quote]                  # output keys written to the blackboard
          output_schema: {type: object, required: [total], properties: {total: {type: number}}}

Everything is validated when the file is loaded (:func:`load`), with errors that name the
entry and the field: a process given a broken file refuses to start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tessera.jsonschema import SchemaError, check_schema
from tessera.semver import parse as parse_version

__all__ = [
    "BRIDGE_AGENT",
    "A2AAgent",
    "A2AAgentsFile",
    "A2AAgentsSettings",
    "A2ACapability",
    "DeclarationError",
    "declared_tools",
    "load",
    "tool_name",
]

BRIDGE_AGENT = "a2a-bridge"
"""The agent identity that serves every declared capability (``Agent::"a2a-bridge"``)."""
TOOL_PREFIX = "a2a."
CAPABILITY_NAME = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
MAX_TIMEOUT_S = 600.0
"""Task tokens live at most 15 min (vault/tools.yaml); an exchange is bounded well within."""


class DeclarationError(ValueError):
    """The declaration file is unreadable or invalid (the message names where)."""


class A2ACapability(BaseModel):
    """The capability contract an A2A agent implements (registered by the bridge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=CAPABILITY_NAME, max_length=128)
    version: str = "1.0.0"
    description: str = ""
    reads: tuple[str, ...] = ()
    """Blackboard keys the coordinator sends; the bridge forwards them to the agent."""
    writes: tuple[str, ...] = ()
    """Keys of the agent's output written to the blackboard (others stay output only)."""
    output_schema: dict[str, Any] | None = None
    """JSON Schema (draft 2020-12) every answer must satisfy (the coordinator checks it)."""
    max_concurrency: int = Field(default=0, ge=0)

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        parse_version(value)  # ValueError naming the problem
        return value

    @field_validator("output_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_schema(value, path="output_schema")
            except SchemaError as exc:
                raise ValueError("; ".join(str(v) for v in exc.violations[:5])) from None
        return value


class A2AAgent(BaseModel):
    """One external A2A agent and the capability it implements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    url: str
    """Base URL of the agent: its card is read from ``<url>/.well-known/agent-card.json``
    (or ``url`` itself when it ends in ``.json``); calls go to the interface the card names."""
    capability: A2ACapability
    timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S)
    side_effect: Literal["read_only", "idempotent_write", "external_action"] = "external_action"
    """What one exchange does to the world. Unset: the most dangerous class."""
    category: str = Field(default="a2a", pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    """The ``category`` attribute Cedar sees on the tool."""
    requires_secret: bool = False
    """Read ``tool-secrets/a2a-<name>`` with the caller's token on every call; its
    ``bearer_token`` field, if any, is sent as ``Authorization: Bearer …``."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials (use requires_secret)")
        return value

    @property
    def tool(self) -> str:
        return tool_name(self.name)


class A2AAgentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agents: tuple[A2AAgent, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> A2AAgentsFile:
        for what, values in (
            ("name", [a.name for a in self.agents]),
            ("capability.name", [a.capability.name for a in self.agents]),
        ):
            seen: set[str] = set()
            for value in values:
                if value in seen:
                    raise ValueError(f"two agents declare {what} {value!r}")
                seen.add(value)
        return self


class A2AAgentsSettings(BaseSettings):
    """Where the declaration file is (``TESSERA_A2A_AGENTS_FILE``)."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore")

    a2a_agents_file: Path | None = None

    @field_validator("a2a_agents_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value


def tool_name(agent: str) -> str:
    """The tool (and Vault scope) of the A2A agent named ``agent``."""
    return TOOL_PREFIX + agent


def load(path: Path | None) -> tuple[A2AAgent, ...]:
    """The declared agents (none when ``path`` is None or the file declares none).

    Raises DeclarationError naming the file, the entry and the field."""
    if path is None:
        return ()
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DeclarationError(f"{path}: cannot read A2A agent declarations: {exc}") from None
    try:
        return A2AAgentsFile.model_validate(data or {}).agents
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
            for err in exc.errors()[:10]
        )
        raise DeclarationError(f"{path}: invalid A2A agent declarations: {problems}") from None


def declared_tools(path: Path | None) -> tuple[str, ...]:
    """The tools (Vault scopes) of the agents ``path`` declares (DeclarationError)."""
    return tuple(agent.tool for agent in load(path))
