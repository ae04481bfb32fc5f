"""Coordinator settings (env ``TESSERA_COORDINATOR_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings


class CoordinatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_COORDINATOR_", extra="ignore", populate_by_name=True
    )

    planner_address: str = Field(
        default="127.0.0.1:50052", validation_alias=AliasChoices("TESSERA_PLANNER_ADDRESS")
    )
    """Where the planner serves PlannerService."""
    tool_proxy_address: str = Field(
        default="", validation_alias=AliasChoices("TESSERA_TOOL_PROXY_ADDRESS")
    )
    """Handed to agents so they can reach the tool proxy."""
    public_url: str = Field(default="", validation_alias=AliasChoices("TESSERA_PUBLIC_URL"))
    """The front door as outside callers reach it (``http://host:port``): where the A2A
    face's agent cards point. Unset: the cards are not served (FAILED_PRECONDITION)."""
    a2a_wait_s: float = Field(default=55.0, gt=0)
    """Longest a blocking A2A ``SendMessage`` waits for its workflow to finish or park on
    a gate before answering the task as it stands (the caller then polls ``GetTask``)."""
    replica_id: str = ""
    """Name of this replica in logs and events; defaults to a random id."""
    ack_wait_s: float = Field(default=0.6, gt=0)
    """How long a crashed replica's step stays invisible before another replica takes it
    over. A live replica extends it every ack_wait_s / 3 while it works, so a step that
    runs for minutes is never taken over while its replica lives. 0.6 s: a killed
    replica's steps move on 0.4-0.6 s after the kill (resume target < 1 s, with room for
    a replacement's ~0.5 s start); a live replica's step survives an event-loop stall of
    up to 0.4 s (two missed extensions); each running step costs 5 small NATS messages a
    second. Redeliveries (`tessera_work_steps_redelivered_total`) that are not explained
    by a crash mean the replica stalls longer than that: raise it. All replicas share
    one consumer and the last one started sets its value, so give them all the same."""
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long a workflow's history is kept after it ended (default 7 days); then it
    leaves the hot state (services/coordinator/retention.py). Export it first with
    `tessera export`."""
    retention_interval_s: float = Field(default=3600.0, gt=0)
    """How often each replica sweeps for expired workflows."""
    task_streams: bool = True
    """Send attempts to SDK agents over one ExecuteTasks stream per replica (an agent that
    does not implement it gets unary ExecuteTask calls); False: unary calls only."""
    dispatch_append_delay_s: float = Field(default=0.05, ge=0)
    """How long the dispatch of an attempt that holds no task token may wait to be
    appended with the first answer that follows it (one write for both; a crash before
    only re-sends the attempt under the same number). While it waits, readers see the
    task as not yet dispatched. 0: every dispatch is appended before it is sent."""
    max_concurrent_steps: int = Field(default=128, gt=0)
    """Workflow steps one replica runs at once."""
    max_active_workflows: int = Field(default=2000, gt=0)
    """Admission limit: workflows running or queued (the work queue's backlog, across
    replicas; parked ones do not count) beyond which StartWorkflow answers
    RESOURCE_EXHAUSTED (MESH_BUSY) with a RetryInfo of a second."""
    max_input_bytes: int = Field(default=256 * 1024, gt=0)
    """Largest serialized StartWorkflow inputs accepted."""
    retry_base_s: float = Field(default=0.1, gt=0)
    """First backoff before retrying a failed attempt; doubles with each failure."""
    retry_max_s: float = Field(default=2.0, gt=0)
    """Longest backoff after an agent's own error (these spend the task's attempts)."""
    transient_retry_max_s: float = Field(default=2.0, gt=0)
    """Longest backoff after a transient fault (agent or dependency unreachable, no live
    replica). These never spend attempts; they are retried until the deadlines, so a
    restarted process's work resumes at most this long after it serves again."""
    workflow_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    """Deadline of a workflow whose StartWorkflow context carries none: past it, a still
    running workflow fails with DEADLINE_EXCEEDED (time parked on a gate extends it).
    Transient faults are retried for as long as it allows."""
    max_workflow_deadline_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    """A requested deadline further away than this is capped to it."""
    gate_expiry_s: float = Field(default=24 * 3600.0, ge=0)
    """How long a gate stays open for a decision: past it, the gate resolves as rejected
    (decided by ``tessera/gate-expiry``, audited) and its workflow ends CANCELLED. Fixed
    for a workflow when it starts; 0: gates never expire. A setting rather than a gate
    policy's annotation: no principal exists yet when a gate opens (docs/decisions.md)."""
    metrics_port: int = 0
    """Prometheus metrics HTTP port on 127.0.0.1; 0 disables the endpoint."""
    policy_dir: Path = Path("policy")
    """``policy_source = "files"`` only: the policy set that decides control-plane actions
    (who starts, cancels, decides what: ``50_workflows.cedar``), loaded in-process and
    reloaded when it changes."""
    policy_poll_interval_s: float = Field(default=1.0, gt=0)
    policy_source: Literal["files", "distributed"] = "distributed"
    """``distributed`` (the default): the set the policy service
    distributes (tessera/policy/distribution.py): a reload reaches the coordinator within
    a second, and a set it cannot confirm current for ``policy_freshness_s`` refuses
    every control-plane action (UNAVAILABLE ``POLICY_STALE``; fail closed). ``files``:
    ``policy_dir``, loaded here (a coordinator without a policy service)."""
    policy_freshness_s: float = Field(default=5.0, gt=0)
    human_subject_claim: str = "preferred_username"
    """Claim of a person's identity token that names them (as Envoy's jwt_authn passes it
    on); must match the gateway's ``TESSERA_GATEWAY_JWT_SUBJECT_CLAIM``."""
    human_groups_claim: str = "groups"
    """Claim that lists their groups (policies' ``principal in Group::"..."``)."""
    agent_tiers_file: Path = Path("policy/agent_tiers.yaml")
    """Trust tier of each agent (security-team config); missing file: all standard."""
    run_workers: bool = True
    """False serves only the API (tests use it to pin who advances workflows)."""


def load_agent_tiers(path: Path) -> dict[str, str]:
    """agent name -> tier, from `{tier: [agent, ...]}`."""
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    return {agent: str(tier) for tier, agents in raw.items() for agent in agents or ()}
