"""The composition root: settings -> gateway + engine -> a Ray Serve application.

`serve run serve.cluster:build_application`, `batchserve up` and the Helm
chart's serveConfigV2 all go through `build_application`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from serve.gateway.app import build_app
from serve.gateway.auth import Authenticator
from serve.gateway.completion import Budget, CompletionService
from serve.gateway.context import GatewayContext
from serve.gateway.tenants import StaticTenantStore, Tenant, TenantStore
from serve.replica.engine import Engine
from serve.settings import Settings


def tenant_store(settings: Settings) -> TenantStore:
    if settings.tenants_file is not None:
        return StaticTenantStore.from_file(settings.tenants_file)
    dev = settings.dev_tenant
    if dev is None:
        return StaticTenantStore({})
    tenant = Tenant(tenant_id=dev.tenant_id, accounts=frozenset({dev.account_id}))
    return StaticTenantStore({dev.token_sha256: tenant})


def build_gateway(
    settings: Settings, engine: Engine, *, replica_id: str = "local", behind_serve: bool = False
) -> FastAPI:
    """The gateway app in front of one engine (also what gateway tests build)."""
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
    )
    ctx = GatewayContext(
        model_name=settings.served_model.name,
        engine=engine,
        authenticator=Authenticator(tenant_store(settings)),
        completions=completions,
        max_body_bytes=settings.max_body_bytes,
        replica_id=replica_id,
        behind_serve=behind_serve,
    )
    return build_app(ctx)


def compose_replica(settings: Settings, replica_id: str) -> tuple[Engine, FastAPI]:
    """One replica: a vLLM engine and the gateway in front of it."""
    from serve.replica.vllm_engine import VllmEngine

    engine = VllmEngine(settings.served_model, cpu_kv_cache_gib=settings.cpu_kv_cache_gib)
    return engine, build_gateway(settings, engine, replica_id=replica_id, behind_serve=True)


def build_application(args: dict[str, Any] | Settings | None = None) -> Any:
    """Ray Serve application builder (`serve run serve.cluster:build_application`)."""
    from serve.replica.deployment import gateway_deployment

    settings = args if isinstance(args, Settings) else Settings(**(args or {}))
    return gateway_deployment(settings).bind(settings.model_dump(mode="json"), compose_replica)


class LocalCluster:
    """A Ray head in this process with the application deployed (`batchserve up`)."""

    APP_NAME = "batchserve"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._descendants: list[Any] = []

    def start(self) -> None:
        import ray
        from ray import serve as rayserve

        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        rayserve.start(http_options={"host": self.settings.host, "port": self.settings.port})
        rayserve.run(
            build_application(self.settings),
            name=self.APP_NAME,
            route_prefix="/",
            blocking=False,
        )

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
