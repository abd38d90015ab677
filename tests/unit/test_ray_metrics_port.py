"""`batchserve up` pins Ray's metrics export port (Ray picks a random one otherwise), so
the local Prometheus config's `ray` job finds Ray Serve's own metrics."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve import cluster
from serve.settings import Settings
from tests.ports import free_port

PROMETHEUS_YML = Path(__file__).parents[2] / "deploy" / "prometheus" / "prometheus.yml"


def started_with(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> dict[str, Any]:
    """The keyword arguments `LocalCluster.start` gives `ray.init` (Ray and Serve faked)."""
    import ray
    from ray import serve as rayserve

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(rayserve, "start", lambda **kwargs: None)
    monkeypatch.setattr(rayserve, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(cluster, "build_application", lambda settings: None)
    cluster.LocalCluster(settings).start()
    return seen


def test_up_gives_ray_the_configured_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    seen = started_with(monkeypatch, Settings(ray_metrics_export_port=port))
    assert seen["_metrics_export_port"] == port


def test_a_taken_port_or_0_leaves_it_to_ray(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = started_with(monkeypatch, Settings(ray_metrics_export_port=0))
    assert seen["_metrics_export_port"] is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        seen = started_with(monkeypatch, Settings(ray_metrics_export_port=port))
    assert seen["_metrics_export_port"] is None
    assert f"metrics export port {port} is taken" in caplog.text


def test_local_prometheus_scrapes_the_default_port() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (ray_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    (targets,) = [c["targets"] for c in ray_job["static_configs"]]
    assert targets == [f"127.0.0.1:{Settings().ray_metrics_export_port}"]
