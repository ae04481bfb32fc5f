"""OpenTelemetry tracing: provider set-up, gRPC interceptors, NATS header propagation.

One workflow is one trace: gRPC hops carry context through the instrumentation
interceptors, NATS messages through W3C ``traceparent`` headers (:func:`inject_headers` on
publish, :func:`extract_context` on receive).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

__all__ = [
    "client_interceptors",
    "configure_tracing",
    "extract_context",
    "inject_headers",
    "server_interceptors",
]

_lock = threading.Lock()
_provider: TracerProvider | None = None


def configure_tracing(
    service: str, exporter: str = "none", endpoint: str | None = None
) -> TracerProvider:
    """Install the process-wide tracer provider and return it.

    ``exporter``: ``none`` (spans are created, so trace ids flow, but not exported),
    ``console`` or ``otlp`` (gRPC; ``endpoint`` or the OTEL_EXPORTER_OTLP_* env vars).
    Idempotent: the first call wins, later calls return the same provider.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
        if exporter == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        elif exporter != "none":
            raise ValueError(f"unknown OTel exporter {exporter!r}: none, console or otlp")
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def server_interceptors() -> list[Any]:
    """grpc.aio server interceptors that continue the caller's trace (outermost first)."""
    return [aio_server_interceptor()]


def client_interceptors() -> list[Any]:
    """grpc.aio client interceptors (all four call kinds) that start client spans."""
    return list(aio_client_interceptors())


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """A copy of ``headers`` plus the current trace context (W3C ``traceparent``)."""
    carrier = dict(headers)
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The OTel context carried by message headers (empty context when there is none)."""
    return propagate.extract(dict(headers or {}))
