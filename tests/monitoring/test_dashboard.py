"""The Grafana dashboard: every panel query runs on a real Prometheus (our rules loaded,
scraping a gateway with the fake engine) without error, and names only series that exist."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from serve.cluster import build_gateway
from serve.gateway.tenants import hash_token
from serve.metrics import GatewayMetrics
from serve.settings import DevTenant, Settings, cpu_catalog
from tests.fakes import FakeEngine
from tests.live_server import serving
from tests.prometheus_server import RULE_FILES, PrometheusServer, prometheus

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "batchserve.json"
TOKEN = "dashboard-token"
ACCOUNT = "acct-dash"
MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
# Grafana's template variables, as Grafana would expand them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*"}
SERIES_NAME = re.compile(r"\b(batchserve[a-z_:0-9]*|[a-z_]+:batchserve[a-z_:0-9]*)")


def expand(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and out
    return out


def known_series() -> set[str]:
    names = {
        rule["record"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    registry = CollectorRegistry()
    GatewayMetrics(registry, model="m")
    for family in registry.collect():
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def test_dashboard_names_only_declared_series() -> None:
    known = known_series()
    for title, expr in panel_queries():
        for name in SERIES_NAME.findall(re.sub(r'"[^"]*"', '""', expr)):
            assert name in known, f"panel {title!r}: {name} is neither a metric nor a rule"


@contextmanager
def gateway() -> Iterator[str]:
    settings = Settings.model_validate(
        {
            "models": [m.model_dump() for m in cpu_catalog("/nonexistent")],
            "dev_tenant": DevTenant(
                tenant_id="t-dash", account_id=ACCOUNT, token_sha256=hash_token(TOKEN)
            ).model_dump(),
        }
    )
    app = build_gateway(settings, FakeEngine(delay_s=0.01), replica_id="replica-a")
    with serving(app) as address:
        yield address


def wait_for(prom: PrometheusServer, expr: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = prom.query(expr)
        if result:
            return result
        assert time.monotonic() < deadline, f"no data for {expr}"
        time.sleep(0.5)


def test_every_panel_query_runs_on_prometheus(tmp_path: Path) -> None:
    with gateway() as target:
        scrape = [{"job_name": "batchserve", "static_configs": [{"targets": [target]}]}]
        with prometheus(tmp_path / "prom", scrape_configs=scrape) as prom:
            run = f"http://{target}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
            auth = {"Authorization": f"Bearer {TOKEN}"}

            def send(i: int) -> None:
                body = {"prompt": f"hello {i}", "stream": i % 2 == 0}
                assert httpx.post(run, headers=auth, json=body, timeout=30).status_code == 200

            # The first request creates the series; the rest are increases Prometheus sees.
            send(0)
            wait_for(prom, "batchserve_generated_tokens_total")
            for i in range(1, 6):
                send(i)
            assert httpx.post(run, json={"prompt": "x"}, timeout=30).status_code == 400
            # Two scrapes after the load, then the rules have something to rate.
            wait_for(prom, "batchserve:generated_tokens:rate1m > 0")
            rules = prom.api("rules")["groups"]
            assert rules and all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
            # Every query must be valid PromQL at once; gateway panels must show data
            # within a few evaluation rounds (the rules need two scrapes to rate).
            deadline = time.monotonic() + 30
            while True:
                empty = []
                for title, expr in panel_queries():
                    result = prom.query(expand(expr))  # raises on a PromQL error
                    gateway_only = "vllm" not in expr and "ray_" not in expr
                    if gateway_only and not result:
                        empty.append((title, expr))
                if not empty or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert not empty, f"gateway panels without data: {empty}"


@pytest.mark.parametrize("variable", ["batchserve_requests_total"])
def test_model_variable_source_exists(variable: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (model_var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert variable in model_var["definition"] and variable in known_series()


# A series the dashboard reads: ours (batchserve_*, recorded *:batchserve*) or the engine's
# (vllm:*, recorded *:vllm_*), with its label matchers if any.
SELECTOR = re.compile(r"(?<![\w:\"])((?:[a-z_]+:)?(?:batchserve|vllm)[a-z_:0-9]*)(\{[^}]*\})?")
# The label that holds the served model: ours `model`, vLLM's `model_name` (served_model_name
# is the API model name, serve/replica/vllm_engine.py).
MODEL_MATCHERS = ('model=~"$model"', 'model_name=~"$model"')


def test_every_model_series_follows_the_model_variable() -> None:
    unfiltered = []
    for title, expr in panel_queries():
        for name, matchers in SELECTOR.findall(expr):
            if not any(m in matchers for m in MODEL_MATCHERS):
                unfiltered.append((title, name))
    assert unfiltered == []
