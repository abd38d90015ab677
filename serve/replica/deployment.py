"""The Ray Serve deployment: each replica owns one engine and the gateway in front of it.

Serve's direct ingress (HAProxy) sends HTTP straight to the replica's own
ASGI app, so no Ray actor hop sits on the per-token path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve as rayserve
from starlette.types import ASGIApp

from serve.replica.engine import Engine
from serve.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaParts:
    """What one replica runs: its engine, the gateway app in front of it, and the health
    check Serve calls (the engine's, through the gateway, which ends the running
    generations of a stalled engine)."""

    engine: Engine
    app: ASGIApp
    check_health: Callable[[], Awaitable[None]]


# Builds one replica's parts; `serve.cluster.compose_replica`.
ReplicaFactory = Callable[[Settings, str], ReplicaParts]


@rayserve.ingress()
class GatewayReplica:
    def __init__(self, settings: dict[str, Any], factory: ReplicaFactory) -> None:
        parsed = Settings.model_validate(settings)
        replica_id = rayserve.get_replica_context().replica_id.unique_id
        parts = factory(parsed, replica_id)
        self._engine, self._app, self._check_health = parts.engine, parts.app, parts.check_health
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
        await self._check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


# Requests a replica's app may hold beyond its engine slots and queue places: ones being
# refused (a 429 takes milliseconds), health checks, metrics scrapes.
ADMISSION_HEADROOM = 256


def max_ongoing_requests(settings: Settings) -> int:
    """Serve's per-replica cap, set above everything our own admission may hold.

    With direct ingress, Serve makes a request wait for this cap *before* the app sees it,
    in a queue with no bound and no timeout: a cap at or below the engine slots plus the
    fair queue would queue a burst there, invisible to our admission (measured: no 429,
    time to first token 28 s). Above it, the app's admission decides and refuses at once.
    """
    return settings.max_inflight_per_replica + settings.queue_max_total + ADMISSION_HEADROOM


def gateway_deployment(settings: Settings) -> Any:
    """The deployment with the options the settings ask for."""
    spec = settings.served_model
    cap = max_ongoing_requests(settings)
    return rayserve.deployment(
        name="batchserve",
        num_replicas=spec.replicas,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        max_ongoing_requests=cap,
        # Serve's own wait for the cap stays bounded too (beyond it Serve answers 503):
        # only reached when a flood outruns the event loop that refuses it.
        max_queued_requests=cap,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
        # How often a draining replica checks whether its last request ended.
        graceful_shutdown_wait_loop_s=0.5,
    )(GatewayReplica)
