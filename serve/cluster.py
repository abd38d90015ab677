"""The composition root: settings -> gateway + engine -> a Ray Serve application.

`serve run serve.cluster:build_application`, `batchserve up` and the Helm
chart's serveConfigV2 all go through `build_application`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from opentelemetry.trace import Tracer
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.registry import Collector

from serve.errors import ReplicaShuttingDown
from serve.gateway.access_log import ACCESS_LOGGER, AccessLog, log_to_stderr
from serve.gateway.admission import Gate
from serve.gateway.app import build_app
from serve.gateway.auth import Authenticator
from serve.gateway.completion import Budget, CompletionService
from serve.gateway.context import GatewayContext
from serve.gateway.fair_queue import FairQueue
from serve.gateway.last_words import LastWords
from serve.gateway.last_words import install as install_last_words
from serve.gateway.ledger import UsageLedger
from serve.gateway.ledger_liveness import LivenessTimers
from serve.gateway.observer import Observability
from serve.gateway.ratelimit import InMemoryRateLimiter, RateLimiter
from serve.gateway.sqlite_ledger import SqliteLedger
from serve.gateway.tenants import FileTenantStore, StaticTenantStore, Tenant, TenantStore
from serve.metrics import GatewayMetrics, ReplicaExposition
from serve.replica.drain import DrainWatch, LearnAddress
from serve.replica.engine import Engine
from serve.settings import Settings

if TYPE_CHECKING:
    from serve.replica.deployment import ReplicaParts

log = logging.getLogger(__name__)


def tenant_store(settings: Settings) -> TenantStore:
    if settings.tenants_file is not None:
        return FileTenantStore(settings.tenants_file, check_s=settings.tenants_reload_s)
    dev = settings.dev_tenant
    if dev is None:
        return StaticTenantStore({})
    tenant = Tenant(tenant_id=dev.tenant_id, accounts=frozenset({dev.account_id}))
    return StaticTenantStore({dev.token_sha256: tenant})


def build_gate(settings: Settings, metrics: GatewayMetrics) -> Gate:
    """Tenant limits, the fair queue and the usage ledger of one replica: in memory and
    SQLite for a single replica, Redis (shared by every replica) when `redis_url` is set."""
    timers = LivenessTimers(
        heartbeat_s=settings.usage_heartbeat_s,
        dead_after_s=settings.usage_owner_dead_after_s,
        sweep_s=settings.usage_sweep_s,
    )
    # With Redis, the local file is only the fallback of an outage, whose records are
    # handed on to Redis: a file of its own, so a single replica's history is not.
    local_name = "usage.sqlite3" if settings.redis_url is None else "usage-fallback.sqlite3"
    local_ledger = SqliteLedger(
        settings.usage_ledger_path or settings.cache_dir / local_name, timers=timers
    )
    limiter: RateLimiter
    ledger: UsageLedger
    if settings.redis_url is None:
        limiter, ledger = InMemoryRateLimiter(), local_ledger
    else:
        from serve.gateway.redis_ledger import RedisLedger
        from serve.gateway.redis_ratelimit import RedisRateLimiter, redis_client

        errors = metrics.ratelimit_backend_errors
        client = redis_client(settings.redis_url, settings.redis_timeout_s)
        limiter = RedisRateLimiter(
            client,
            fail_open=settings.rate_limit_fail_open,
            timeout_s=settings.redis_timeout_s,
            on_error=lambda action: errors.labels(action).inc(),
        )
        ledger = RedisLedger(
            client,
            timeout_s=settings.redis_timeout_s,
            fallback=local_ledger,
            on_error=lambda action: errors.labels(action).inc(),
            timers=timers,
        )
    queue = FairQueue(
        settings.engine_slots,
        max_queued_per_tenant=settings.queue_max_per_tenant,
        max_wait_s=settings.queue_max_wait_s,
        retry_after_s=settings.retry_after_seconds,
        reserved=settings.reserved_slots,
        max_queued_total=settings.queue_max_total,
    )
    return Gate(limiter, queue, ledger)


def _configured_tracer(settings: Settings, replica_id: str) -> Tracer | None:
    if settings.otel_traces_endpoint is None:
        return None
    from serve.gateway.tracing import otlp_tracer

    return otlp_tracer(settings.otel_traces_endpoint, replica_id=replica_id)


def build_gateway(
    settings: Settings,
    engine: Engine,
    *,
    replica_id: str = "local",
    behind_serve: bool = False,
    registry: CollectorRegistry | None = None,
    engine_metrics: Collector | None = None,
    tracer: Tracer | None = None,
    last_words: LastWords | None = None,
) -> FastAPI:
    """The gateway app in front of one engine (also what gateway tests build).

    Gateway metrics go to `registry` (a fresh one by default); `/metrics` serves them
    and, when given, the engine's own metrics (`engine_metrics`), replica-labelled, and
    the connections the replica's keeper (`last_words`) could not take.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = GatewayMetrics(registry, model=settings.served_model.name)
    if last_words is not None:
        unprotected = metrics.last_words_unprotected
        last_words.on_unprotected = lambda reason: unprotected.labels(reason).inc()
    observability = Observability(
        metrics=metrics,
        access_log=AccessLog(
            logging.getLogger(ACCESS_LOGGER),
            model=settings.served_model.name,
            replica=replica_id,
            enabled=settings.access_log,
            log_prompts=settings.log_prompts,
        ),
        exposition=ReplicaExposition(
            [registry] if engine_metrics is None else [registry, engine_metrics],
            replica=replica_id,
        ),
        tracer=tracer if tracer is not None else _configured_tracer(settings, replica_id),
    )
    budget = Budget(
        context_window=engine.info.context_window,
        default_max_tokens=settings.default_max_tokens,
        default_temperature=settings.default_temperature,
        non_stream_max_tokens=settings.non_stream_max_tokens,
    )
    completions = CompletionService(
        engine,
        budget,
        max_inflight=settings.max_inflight_per_replica,
        retry_after_s=settings.retry_after_seconds,
        metrics=metrics,
        gate=(gate := build_gate(settings, metrics)),
        request_timeout_s=settings.request_timeout_s,
    )
    ctx = GatewayContext(
        model_name=settings.served_model.name,
        engine=engine,
        authenticator=Authenticator(tenant_store(settings)),
        completions=completions,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        replica_id=replica_id,
        behind_serve=behind_serve,
        stream_padding=settings.stream_padding,
        stream_heartbeat_s=settings.stream_heartbeat_s,
        # Behind Serve the app's writes never block (Serve queues them): the guard on
        # Serve's own server (serve.gateway.serve_http) watches the client instead.
        stream_stall_s=None if behind_serve else settings.stream_stall_s,
        ledger=gate.ledger,
    )
    return build_app(ctx, observability)


def compose_replica(settings: Settings, replica_id: str) -> ReplicaParts:
    """One replica: a vLLM engine and the gateway in front of it."""
    from serve.replica.deployment import ReplicaParts
    from serve.replica.vllm_engine import VllmEngine, export_vllm_environment

    # This process's environment is vLLM's configuration too: before the engine starts
    # (the one place it is set for `up`, the chart and `serve run` alike).
    export_vllm_environment(cpu_kv_cache_gib=settings.cpu_kv_cache_gib)
    engine = VllmEngine(
        settings.served_model,
        content_as_text=settings.chat_content_as_text,
        stall_s=settings.engine_stall_s,
        otlp_traces_endpoint=settings.otel_traces_endpoint,
    )
    log_to_stderr(logging.getLogger(ACCESS_LOGGER))  # one JSON line per request
    # Serve starts the replica's own HTTP server after this constructor: give it a
    # deadline for request headers, which uvicorn lacks (slowloris without HAProxy), and
    # a keeper that answers its clients should this process die (started after the
    # engine's processes were forked, which would inherit its socket).
    keeper = LastWords()
    if settings.replica_last_words:
        keeper.start()
    install_last_words(keeper, settings.http_request_timeout_s)
    # vLLM records its engine metrics (vllm:*) in prometheus_client's default registry
    # of this process; the replica's /metrics serves them beside the gateway's.
    app = build_gateway(
        settings,
        engine,
        replica_id=replica_id,
        behind_serve=True,
        engine_metrics=REGISTRY,
        last_words=keeper,
    )
    completions: CompletionService = app.state.completions
    if settings.drain_poll_s > 0 and _direct_ingress():
        watch = DrainWatch(
            lambda: completions.close(ReplicaShuttingDown),
            budget_s=settings.graceful_shutdown_timeout_s,
            poll_s=settings.drain_poll_s,
        )
        app.add_middleware(LearnAddress, watch=watch)
    return ReplicaParts(engine=engine, app=app, check_health=completions.check_health)


def _direct_ingress() -> bool:
    """Whether requests reach the replica on its own port (a drain is then seen on its
    /-/healthz), not through Serve's proxy actor."""
    from ray.serve._private import constants

    return bool(getattr(constants, "RAY_SERVE_ENABLE_DIRECT_INGRESS", False))


def build_application(args: dict[str, Any] | Settings | None = None) -> Any:
    """Ray Serve application builder (`serve run serve.cluster:build_application`)."""
    from serve.replica.deployment import gateway_deployment

    settings = args if isinstance(args, Settings) else Settings(**(args or {}))
    return gateway_deployment(settings).bind(settings.model_dump(mode="json"), compose_replica)


# A drain may take this long beyond graceful_shutdown_timeout_s: Serve's minimum draining
# period (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, 2 s under `up`) and stopping
# the replica actors.
DRAIN_MARGIN_S = 30.0
# After the drain, what HAProxy still holds is answered at once (the 503 page); this only
# bounds a request that is slow to send or read its answer.
INGRESS_STOP_S = 5.0


def metrics_export_port(configured: int) -> int | None:
    """The metrics export port to give Ray: the configured one if it is free, else None
    (Ray picks one, as for 0). Ray's agent would fail to start on a taken port, and with
    it the whole node."""
    import socket

    if configured == 0:
        return None
    with socket.socket() as probe:
        # As Ray's exporter binds it (prometheus_client's server reuses addresses).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", configured))
        except OSError as err:
            log.warning(
                "Ray's metrics export port %d is taken (%s): Ray picks another one, "
                "which deploy/prometheus/prometheus.yml does not scrape",
                configured,
                err.strerror,
            )
            return None
    return configured


class LocalCluster:
    """A Ray head in this process with the application deployed (`batchserve up`)."""

    APP_NAME = "batchserve"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._descendants: list[Any] = []

    def start(self, after_ray_init: Callable[[], object] = lambda: None) -> None:
        """Start Ray, Serve and the application; returns once Serve reports it running
        (HAProxy may serve a little before). `after_ray_init` runs as soon as `ray.init`
        returned (which installs Ray's own signal handling)."""
        import ray
        from ray import serve as rayserve

        ray.init(
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
            _metrics_export_port=metrics_export_port(self.settings.ray_metrics_export_port),
        )
        after_ray_init()
        rayserve.start(http_options={"host": self.settings.host, "port": self.settings.port})
        rayserve.run(
            build_application(self.settings),
            name=self.APP_NAME,
            route_prefix="/",
            blocking=False,
        )

    def rollout(self) -> None:
        """Rolling restart: deploy the application again. Serve gives every `run` a new
        version, so it replaces the replicas one at a time; each old one drains (HAProxy
        stops sending it requests, its streams finish within graceful_shutdown_timeout_s)
        and new replicas import the code on disk afresh. Returns when all are replaced."""
        from ray import serve as rayserve

        rayserve.run(build_application(self.settings), name=self.APP_NAME, route_prefix="/")

    def drain(self) -> bool:
        """Delete the application, as a rolling restart retires a replica: each replica
        stops passing its health check (HAProxy, still running, sends it nothing new),
        serves its requests for up to graceful_shutdown_timeout_s (ending those still
        running just before with an error event, serve/replica/drain.py) and stops.
        Then HAProxy is soft-stopped. Returns True once all replicas have stopped, or
        False when that took longer than the budget plus DRAIN_MARGIN_S. `stop` right
        away would kill HAProxy with Serve's proxies and cut every stream it carries."""
        from ray import serve as rayserve

        # Not Serve's blocking delete: it gives up after a fixed 60 s, with an exception.
        rayserve.delete(self.APP_NAME, _blocking=False)
        deadline = time.monotonic() + self.settings.graceful_shutdown_timeout_s + DRAIN_MARGIN_S
        drained = False
        while not drained and time.monotonic() < deadline:
            drained = self.APP_NAME not in rayserve.status().applications
            if not drained:
                time.sleep(0.5)
        self._stop_ingress()
        return drained

    def _stop_ingress(self) -> None:
        """Soft-stop HAProxy before Serve's shutdown SIGKILLs it (serve/ingress.py,
        `soft_stop`): new connections are refused from here on, and what it holds on
        kept-alive connections is answered, not cut."""
        import psutil

        from serve.ingress import soft_stop

        soft_stop(psutil.Process().children(recursive=True), INGRESS_STOP_S)

    def stop(self) -> None:
        """Stop Serve and Ray, then anything they left behind (engine processes)."""
        import psutil
        import ray
        from ray import serve as rayserve

        me = psutil.Process()
        self._descendants = me.children(recursive=True)
        try:
            if ray.is_initialized():
                rayserve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
            survivors = [p for p in self._descendants if p.is_running()]
            for proc in survivors:
                with _suppress_gone():
                    proc.terminate()
            _, alive = psutil.wait_procs(survivors, timeout=10)
            for proc in alive:
                with _suppress_gone():
                    proc.kill()


def _suppress_gone() -> Any:
    import contextlib

    import psutil

    return contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied)
