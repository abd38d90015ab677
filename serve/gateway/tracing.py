"""OpenTelemetry traces (off by default): one gateway span per request, linked to vLLM's.

`TracingMiddleware` opens a SERVER span per request (continuing a W3C
`traceparent` the client sent); `current_trace_headers` carries that span's
context into the engine request, so vLLM's own spans (with
`otlp_traces_endpoint` set) become its children.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNTRACED_PATHS = frozenset({"/metrics", "/healthz"})


def otlp_tracer(endpoint: str, *, replica_id: str) -> Tracer:
    """A tracer exporting to an OTLP/HTTP collector (`.../v1/traces`)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": "batchserve", "service.instance.id": replica_id})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer("batchserve.gateway")


def current_trace_headers() -> dict[str, str] | None:
    """W3C trace context of the active span, for the engine request; None when untraced."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class TracingMiddleware:
    def __init__(self, app: ASGIApp, *, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        carrier: dict[str, Any] = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        parent = propagate.extract(carrier)
        with self.tracer.start_as_current_span(
            "batchserve.request", context=parent, kind=SpanKind.SERVER
        ) as span:
            span.set_attribute("http.request.method", scope["method"])
            span.set_attribute("url.path", scope["path"])

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", int(message["status"]))
                await send(message)

            await self.app(scope, receive, send_traced)
