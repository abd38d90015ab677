"""OpenTelemetry: a gateway span per request, its context handed to the engine request."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from serve.cluster import build_gateway
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, RUN_URL, TOKEN

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


async def test_request_span_continues_the_client_trace_into_the_engine(
    settings: Settings,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = FakeEngine(reply="a b c")
    app = build_gateway(settings, engine, tracer=provider.get_tracer("test"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for stream in (False, True):
            r = await client.post(
                RUN_URL,
                headers={**AUTH, "traceparent": TRACEPARENT},
                json={"prompt": "hi", "stream": stream},
            )
            assert r.status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # not traced

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["batchserve.request"] * 2
    for span, request in zip(spans, engine.requests, strict=True):
        assert span.kind is SpanKind.SERVER
        assert f"{span.context.trace_id:032x}" == CLIENT_TRACE
        assert span.attributes is not None
        assert span.attributes["http.response.status_code"] == 200
        assert TOKEN not in str(dict(span.attributes))
        headers = request.trace_headers
        assert headers is not None
        assert headers["traceparent"].split("-")[1:3] == [
            CLIENT_TRACE,
            f"{span.context.span_id:016x}",
        ]


async def test_tracing_is_off_by_default(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        RUN_URL, headers={**AUTH, "traceparent": TRACEPARENT}, json={"prompt": "hi"}
    )
    assert r.status_code == 200
    assert engine.requests[-1].trace_headers is None
