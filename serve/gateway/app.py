"""`build_app`: the gateway's composition of middleware, error handlers and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serve.errors import BatchserveError, FrameworkHttpError, MethodNotAllowed, RouteNotFound
from serve.gateway.catalog_routes import catalog_router
from serve.gateway.context import GatewayContext
from serve.gateway.error_wire import as_batchserve_error, dialect_of, error_response
from serve.gateway.models_routes import models_router
from serve.gateway.observer import Observability, RequestObserver
from serve.gateway.openai_routes import openai_router
from serve.gateway.openapi_doc import GatewayAPI
from serve.gateway.request_id import RequestIdMiddleware
from serve.gateway.request_record import record_of
from serve.gateway.security_headers import ResponseHeadersMiddleware
from serve.gateway.tracing import TracingMiddleware
from serve.gateway.usage_routes import usage_router
from serve.gateway.workers_ai_routes import workers_ai_router


def build_app(ctx: GatewayContext, observability: Observability) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The usage ledger's heartbeat and sweep of dead replicas' requests (its first
        # write-ahead entry also starts them when the host runs no lifespan). Stopped, not
        # closed: a host may run the lifespan of one app more than once (test clients).
        if ctx.ledger is not None:
            await ctx.ledger.start()
        try:
            yield
        finally:
            if ctx.ledger is not None:
                await ctx.ledger.stop()

    app = GatewayAPI(
        title="batchserve",
        summary="Workers AI text-generation API (and OpenAI chat) on vLLM",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    # The replica's health check goes through the completions (`serve.cluster`).
    app.state.completions = ctx.completions
    # Inside the request id middleware: the observer's log line carries the id.
    app.add_middleware(
        RequestObserver, metrics=observability.metrics, access_log=observability.access_log
    )
    app.add_middleware(RequestIdMiddleware, behind_serve=ctx.behind_serve)
    gate = ctx.completions.gate
    # Security + X-RateLimit-* headers (read from the limiter when admission did not run).
    app.add_middleware(ResponseHeadersMiddleware, limiter=gate.limiter if gate else None)
    if observability.tracer is not None:  # outermost: the span covers the whole request
        app.add_middleware(TracingMiddleware, tracer=observability.tracer)

    async def on_batchserve_error(request: Request, exc: Exception) -> Response:
        record_of(request.scope).fail(exc)
        return error_response(as_batchserve_error(exc), dialect_of(request.url.path))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        err: BatchserveError
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            err = MethodNotAllowed(
                request.method, allowed=tuple(sorted(m.strip() for m in allow.split(",") if m))
            )
        elif exc.status_code == 404:
            err = RouteNotFound(request.url.path)
        else:
            err = FrameworkHttpError(exc.status_code, str(exc.detail))
        record_of(request.scope).fail(err)
        return error_response(err, dialect_of(request.url.path))

    app.add_exception_handler(BatchserveError, on_batchserve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_batchserve_error)

    app.include_router(workers_ai_router(ctx))
    app.include_router(models_router(ctx))
    app.include_router(catalog_router(ctx))
    app.include_router(openai_router(ctx))
    app.include_router(usage_router(ctx))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text exposition: gateway metrics and the engine's, replica-labelled."""
        return observability.metrics_response()

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, object]:
        return {
            "status": "ok",
            "model": ctx.model_name,
            "weights": ctx.engine.info.weights,
            "replica": ctx.replica_id,
            "engine_unfinished_requests": ctx.engine.num_unfinished_requests(),
            "requests_started": ctx.completions.started_total,
        }

    return app
