"""Prometheus metrics of the coordinator (served on TESSERA_COORDINATOR_METRICS_PORT)."""

from prometheus_client import Counter, Histogram

WORKFLOWS_STARTED = Counter("tessera_workflows_started_total", "Workflows started")
WORKFLOWS_REFUSED = Counter(
    "tessera_workflows_refused_total", "StartWorkflow calls refused by admission control"
)
WORKFLOWS_FINISHED = Counter("tessera_workflows_finished_total", "Workflows finished", ["state"])
TASKS_DISPATCHED = Counter(
    "tessera_tasks_dispatched_total", "Task attempts sent to agents", ["capability"]
)
TASK_OUTCOMES = Counter(
    "tessera_task_outcomes_total", "Task attempt outcomes", ["capability", "outcome"]
)
HANDOFFS = Counter("tessera_handoffs_total", "Supervisor handoffs")
GUARDRAILS = Counter("tessera_guardrails_tripped_total", "Guardrail trips", ["guardrail"])
STEP_SECONDS = Histogram(
    "tessera_workflow_step_seconds",
    "Time one replica spent advancing a workflow before it parked or finished",
)
STEPS_REDELIVERED = Counter(
    "tessera_work_steps_redelivered_total",
    "Work steps received again (a dead replica's, a failed one, or a live one whose "
    "heartbeat came later than ack_wait)",
)
