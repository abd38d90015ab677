"""The Ray Serve deployment: each replica owns one engine and the gateway in front of it.

Serve's direct ingress (HAProxy) sends HTTP straight to the replica's own
ASGI app, so no Ray actor hop sits on the per-token path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray import serve as rayserve
from starlette.types import ASGIApp

from serve.replica.engine import Engine
from serve.settings import Settings

log = logging.getLogger(__name__)

# Builds (engine, gateway app) for one replica; `serve.cluster.compose_replica`.
ReplicaFactory = Callable[[Settings, str], tuple[Engine, ASGIApp]]


@rayserve.ingress()
class GatewayReplica:
    def __init__(self, settings: dict[str, Any], factory: ReplicaFactory) -> None:
        parsed = Settings.model_validate(settings)
        replica_id = rayserve.get_replica_context().replica_id.unique_id
        self._engine, self._app = factory(parsed, replica_id)
        log.info(
            "replica %s serving %s with weights %s",
            replica_id,
            parsed.served_model.name,
            self._engine.info.weights,
        )

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self._app

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def gateway_deployment(settings: Settings) -> Any:
    """The deployment with the options the settings ask for."""
    spec = settings.served_model
    return rayserve.deployment(
        name="batchserve",
        num_replicas=spec.replicas,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        # Our own admission answers 429 before Serve would queue.
        max_ongoing_requests=settings.max_inflight_per_replica * 2,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
    )(GatewayReplica)
