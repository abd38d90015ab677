"""Latency alerts compare a histogram_quantile to a threshold: the threshold must be a bucket
boundary of that histogram, or linear interpolation inside the bucket around it makes the
alert fire while every request is inside the SLO (or stay quiet while many are not)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Histogram

from serve.metrics import GatewayMetrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
# `model:batchserve_<name>_seconds:quantile_5m{...} > 2`
QUANTILE_ALERT = re.compile(
    r"^\w*:(batchserve_\w+_seconds):quantile_\w+(?:\{[^}]*\})?\s*>\s*([\d.]+)$"
)


def histogram_buckets() -> dict[str, tuple[float, ...]]:
    metrics = GatewayMetrics(CollectorRegistry(), model="m")
    return {
        h._name: tuple(h._upper_bounds) for h in vars(metrics).values() if isinstance(h, Histogram)
    }


def quantile_alerts() -> list[tuple[str, str, float]]:
    found = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                match = QUANTILE_ALERT.match(" ".join(str(rule["expr"]).split()))
                if match:
                    found.append((rule["alert"], match[1], float(match[2])))
    return found


def test_latency_alert_thresholds_are_bucket_boundaries() -> None:
    buckets = histogram_buckets()
    alerts = quantile_alerts()
    assert any(name == "BatchserveTimeToFirstTokenOverSLO" for name, _, _ in alerts)
    for name, metric, threshold in alerts:
        assert threshold in buckets[metric], (
            f"{name}: {threshold} s is not a bucket of {metric} {buckets[metric]}"
        )
