"""structlog JSON logging with context, trace ids and secret redaction.

Every line is one JSON object on stdout with ``timestamp`` (ISO-8601 UTC), ``level``,
``event``, ``service``, everything bound with :func:`bind_context` (e.g. ``workflow_id``,
``task_id``), and ``trace_id``/``span_id`` while a span is active. stdlib logging (grpc,
nats, hvac…) goes through the same renderer. Values of keys that look like credentials are
replaced by ``"[redacted]"`` at any depth.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "bind_context",
    "clear_context",
    "configure_logging",
    "is_sensitive_key",
    "redact",
]

REDACTED = "[redacted]"
_SENSITIVE = ("token", "secret", "password", "secret_id", "authorization", "credential")
_HANDLER_MARK = "_tessera_handler"


# Matched with separators removed, so X-Api-Key and api_key both count.
_SENSITIVE_SQUASHED = ("apikey", "privatekey", "passwd", "cookie", "sessionkey", "accesskey")


def is_sensitive_key(key: object) -> bool:
    """The one rule for keys whose values never reach a log line or an audit record."""
    lowered = str(key).lower()
    squashed = re.sub(r"[^a-z0-9]", "", lowered)
    return any(word in lowered for word in _SENSITIVE) or any(
        word in squashed for word in _SENSITIVE_SQUASHED
    )


_is_sensitive = is_sensitive_key


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_sensitive(k) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide values of credential-like keys, recursively."""
    for key in list(event_dict):
        if _is_sensitive(key):
            event_dict[key] = REDACTED
        else:
            value = event_dict[key]
            if isinstance(value, Mapping | list | tuple):
                event_dict[key] = _redact_value(value)
    return event_dict


def _add_trace_ids(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    return event_dict


def _add_service(service: str) -> Processor:
    def processor(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return processor


def configure_logging(service: str, level: str = "info", *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to one JSON stream (stdout unless ``stream``).

    Safe to call again (e.g. in tests): it replaces the handler it installed before.
    """
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
        _add_trace_ids,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def bind_context(**kv: Any) -> None:
    """Bind fields (``workflow_id=…``, ``task_id=…``) to every log line of this context."""
    structlog.contextvars.bind_contextvars(**kv)


def clear_context() -> None:
    """Drop every field bound with :func:`bind_context` in this context."""
    structlog.contextvars.clear_contextvars()
