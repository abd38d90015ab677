"""`RequestObserver`: the ASGI middleware that settles every request once.

It opens a `RequestRecord` when the request arrives and, when the response is
finished (or the client went away, or the app raised), counts the request by
outcome, observes its end-to-end latency, counts rejections, clamps and
disconnects, and writes the access log line. A pure ASGI middleware: streams
pass through unbuffered.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from opentelemetry.trace import Tracer
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import OutOfCapacity
from serve.gateway.access_log import AccessLog
from serve.gateway.error_wire import dialect_of
from serve.gateway.request_id import INFERENCE_ID_KEY, request_id_of
from serve.gateway.request_record import RECORD_KEY, RequestRecord
from serve.metrics import GatewayMetrics, ReplicaExposition, status_class, yes_no

UNOBSERVED_PATHS = frozenset({"/metrics", "/healthz"})


class RequestObserver:
    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics, access_log: AccessLog) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNOBSERVED_PATHS:
            await self.app(scope, receive, send)
            return
        record = RequestRecord(
            dialect=dialect_of(scope["path"]).value,
            output=[] if self.access_log.log_prompts else None,
        )
        scope.setdefault("state", {})[RECORD_KEY] = record
        sent_status = 0

        async def send_observed(message: Message) -> None:
            nonlocal sent_status
            if message["type"] == "http.response.start":
                sent_status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except asyncio.CancelledError:
            record.disconnected = True
            raise
        except BaseException as exc:
            record.fail(exc)
            raise
        finally:
            self.settle(scope, record, sent_status)

    def settle(self, scope: Scope, record: RequestRecord, sent_status: int) -> None:
        ended_at = time.monotonic()
        status = record.outcome_status(sent_status)
        m = self.metrics
        model, dialect, stream = m.model, record.dialect, yes_no(record.stream)
        klass = status_class(status)
        m.requests.labels(model, record.plan, dialect, stream, klass).inc()
        m.request_duration.labels(model, dialect, stream, klass).observe(
            ended_at - record.arrived_at
        )
        if isinstance(record.failure, OutOfCapacity):
            m.rejections.labels(model, record.failure.reason).inc()
        if record.clamped:
            m.non_stream_clamps.labels(model, dialect).inc()
        if record.disconnected:
            m.client_disconnects.labels(model, dialect).inc()
        state = scope.get("state", {})
        self.access_log.write(
            self.access_log.line(
                record,
                request_id=request_id_of(scope),
                inference_id=state.get(INFERENCE_ID_KEY),
                method=str(scope.get("method", "")),
                path=str(scope["path"]),
                status=status,
                ended_at=ended_at,
            )
        )


@dataclass(frozen=True)
class Observability:
    """What `build_app` needs to observe requests and serve `/metrics`."""

    metrics: GatewayMetrics
    access_log: AccessLog
    exposition: ReplicaExposition
    # OpenTelemetry tracer (None: tracing off, the default).
    tracer: Tracer | None = None

    def metrics_response(self) -> Response:
        return Response(self.exposition.render(), media_type=self.exposition.content_type)
