"""Planner settings (env ``TESSERA_PLANNER_*``; shared infrastructure ones ``TESSERA_*``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from tessera.runtime.config import ServiceSettings

__all__ = ["BUILTIN_TEMPLATES_DIR", "PlannerSettings"]

BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
"""The reference workflow templates shipped with the planner."""


class PlannerSettings(ServiceSettings):
    """Everything the planner reads from its environment, built once in ``__main__``."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_PLANNER_", extra="ignore", populate_by_name=True
    )

    listen: str = "127.0.0.1:50052"
    """host:port to bind (the coordinator's default ``TESSERA_PLANNER_ADDRESS``)."""

    templates_dir: Path = BUILTIN_TEMPLATES_DIR
    """Directory of ``<name>.yaml`` workflow templates (``TESSERA_PLANNER_TEMPLATES_DIR``)."""
    extra_template_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """More template directories teams add (``TESSERA_PLANNER_EXTRA_TEMPLATE_DIRS``,
    separated by ``os.pathsep`` or commas). A name defined twice is a startup error."""

    min_confidence: float = Field(default=0.35, ge=0.0, le=1.0)
    """A free-text goal whose best template scores below this is GOAL_NOT_UNDERSTOOD."""
    max_input_bytes: int = Field(default=256 * 1024, gt=0)
    """Largest serialized ``PlanRequest.inputs`` accepted (RESOURCE_EXHAUSTED above)."""

    max_depth: int = Field(default=10, gt=0)
    """Longest dependency chain (in tasks) a plan may have."""
    max_fan_out: int = Field(default=10, gt=0)
    """Most tasks that may depend on one task."""
    max_tasks: int = Field(default=50, gt=0)
    """Most tasks in one plan."""
    default_max_attempts: int = Field(default=3, gt=0)
    """Attempts filled in for tasks that give none."""
    default_timeout_s: float = Field(default=30.0, gt=0)
    """Per-attempt timeout filled in when neither the task nor the contract gives one."""

    llm_url: str = ""
    """Base URL of an OpenAI-compatible API (``…/v1/chat/completions`` is appended);
    empty (the default) disables the LLM planning backend."""
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    """Bearer token for the LLM API (``TESSERA_PLANNER_LLM_API_KEY``)."""
    llm_timeout_s: float = Field(default=20.0, gt=0)

    @field_validator("extra_template_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            parts = value.replace(",", os.pathsep).split(os.pathsep)
            return [Path(p.strip()) for p in parts if p.strip()]
        return value

    @property
    def template_dirs(self) -> list[Path]:
        """Every template directory, the main one first."""
        return [self.templates_dir, *self.extra_template_dirs]
