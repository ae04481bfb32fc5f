"""Planning backends: where a task graph for a goal comes from.

* :class:`TemplateBackend` (always on): picks a template by intent classification.
* :class:`OpenAICompatibleBackend` (off unless ``TESSERA_PLANNER_LLM_URL`` is set): asks an
  OpenAI-compatible chat-completions API for a JSON task graph. It returns ``None`` when
  the model is unreachable or answers something that is not a task graph, so the planner
  falls back to templates; whatever it returns goes through the same validation as any
  other plan.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.error
import urllib.request
from typing import Any, Protocol

import structlog
from google.protobuf import json_format, struct_pb2

from services.planner.intent import IntentMatch, choose
from services.planner.templates import Template, TemplateCatalog, check_inputs
from tessera.v1 import planner_pb2

__all__ = [
    "OpenAICompatibleBackend",
    "PlanningBackend",
    "TemplateBackend",
    "parse_task_graph",
]

log = structlog.get_logger(__name__)

MAX_RESPONSE_BYTES = 1024 * 1024
MAX_PROMPT_INPUT_CHARS = 8 * 1024
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_KINDS = {"agent": "TASK_KIND_AGENT", "approval_gate": "TASK_KIND_APPROVAL_GATE"}
_OPERATORS = {
    "LTE": "CONSTRAINT_OPERATOR_LTE",
    "GTE": "CONSTRAINT_OPERATOR_GTE",
    "PRESENT": "CONSTRAINT_OPERATOR_PRESENT",
}


class PlanningBackend(Protocol):
    """Something that proposes a task graph for a goal (``None``: no proposal)."""

    async def plan(
        self, goal: str, inputs: struct_pb2.Struct, templates: TemplateCatalog
    ) -> planner_pb2.TaskGraph | None: ...


class TemplateBackend:
    """Deterministic: the template the goal names or means (see :mod:`.intent`)."""

    def __init__(self, *, min_confidence: float = 0.35) -> None:
        self.min_confidence = min_confidence

    def select(self, goal: str, templates: TemplateCatalog) -> tuple[Template, list[IntentMatch]]:
        """The chosen template and the ranked matches; raises NOT_FOUND /
        INVALID_ARGUMENT as :func:`services.planner.intent.choose` documents."""
        return choose(goal, templates, min_confidence=self.min_confidence)

    async def plan(
        self, goal: str, inputs: struct_pb2.Struct, templates: TemplateCatalog
    ) -> planner_pb2.TaskGraph:
        template, _ = self.select(goal, templates)
        check_inputs(template, inputs)
        return template.build(inputs)


def parse_task_graph(text: str) -> planner_pb2.TaskGraph:
    """A task graph from a model's answer: proto3 JSON of ``TaskGraph`` (optionally in a
    ```json fence or under a ``"plan"`` key), with ``kind: agent|approval_gate``,
    ``operator: LTE|GTE|PRESENT`` and ``timeout_s`` shortcuts. ``ValueError`` otherwise."""
    text = text.strip()
    fenced = _FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    data.pop("blackboard", None)
    for task in data.get("tasks") or []:
        if not isinstance(task, dict):
            continue
        kind = task.get("kind")
        if isinstance(kind, str) and kind.lower() in _KINDS:
            task["kind"] = _KINDS[kind.lower()]
        timeout_s = task.pop("timeout_s", None)
        if isinstance(timeout_s, int | float) and "timeout" not in task:
            task["timeout"] = f"{float(timeout_s):.3f}s"
    for rule in data.get("constraints") or []:
        if isinstance(rule, dict):
            op = rule.get("operator")
            if isinstance(op, str) and op.upper() in _OPERATORS:
                rule["operator"] = _OPERATORS[op.upper()]
    graph = planner_pb2.TaskGraph()
    try:
        json_format.ParseDict(data, graph, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(f"not a task graph: {exc}") from None
    return graph


_SYSTEM_PROMPT = """\
You are the planner of a multi-agent workflow engine. Turn the user's goal into a task
graph and answer with ONE JSON object only, no prose:
{"template": "<template name it follows, or empty>",
 "tasks": [{"id": "<unique, [A-Za-z0-9_-]>", "kind": "agent" | "approval_gate",
            "capability": "<capability name>", "version": "^1.0",
            "depends_on": ["<task id>"], "tools": ["<tool>"], "timeout_s": <seconds>,
            "max_attempts": <n>, "optional": false, "gate_reason": "<approval gates>"}],
 "budget": {"max_tokens": <n>, "max_cost_micros": <n>, "max_tool_calls": <n>,
            "max_iterations": <n>},
 "constraints": [{"key": "<dotted path>", "operator": "LTE" | "GTE" | "PRESENT",
                  "limit_key": "<dotted path>", "description": "<rule>"}],
 "max_iterations": <n>}
The graph must be acyclic. Use only capabilities and tools from these templates:
"""


class OpenAICompatibleBackend:
    """Plans with an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``api_key`` (or, if ``api_key_env`` is given, that environment variable read once
    here) is sent as a bearer token and never logged. Calls run in a worker thread with
    ``timeout_s``; any failure is logged and yields ``None``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env) or None
        self._api_key = api_key
        self.timeout_s = timeout_s

    def _messages(
        self, goal: str, inputs: struct_pb2.Struct, templates: TemplateCatalog
    ) -> list[dict[str, str]]:
        catalog = [
            {
                "name": t.name,
                "description": t.description,
                "inputs": [i.model_dump() for i in t.inputs],
                "tasks": [task.model_dump(exclude_defaults=True) for task in t.tasks],
                "budget": t.budget.model_dump(),
                "constraints": [c.model_dump() for c in t.constraints],
            }
            for t in templates.values()
        ]
        inputs_json = json.dumps(json_format.MessageToDict(inputs), sort_keys=True)
        if len(inputs_json) > MAX_PROMPT_INPUT_CHARS:
            inputs_json = inputs_json[:MAX_PROMPT_INPUT_CHARS] + "…(truncated)"
        return [
            {"role": "system", "content": _SYSTEM_PROMPT + json.dumps(catalog, indent=1)},
            {"role": "user", "content": f"Goal: {goal}\nInputs: {inputs_json}"},
        ]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ValueError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("response is not a JSON object")
        return data

    async def plan(
        self, goal: str, inputs: struct_pb2.Struct, templates: TemplateCatalog
    ) -> planner_pb2.TaskGraph | None:
        body = {
            "model": self.model,
            "messages": self._messages(goal, inputs, templates),
            "temperature": 0,
            "response_format": {"type": "json_object"},
        }
        try:
            data = await asyncio.to_thread(self._post, body)
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise ValueError("completion content is not a string")
            graph = parse_task_graph(content)
        except urllib.error.HTTPError as exc:
            log.warning("llm_plan_failed", url=self.url, status=exc.code, error=exc.reason)
            return None
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("llm_plan_failed", url=self.url, error=repr(exc))
            return None
        log.info(
            "llm_plan_proposed", model=self.model, tasks=len(graph.tasks), template=graph.template
        )
        return graph
