"""The Prometheus rules and config: promtool checks them and runs their unit tests,
and every alert has a unit test."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.prometheus_server import PROMETHEUS_DIR, RULE_FILES, alert_rules, tool

TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool(*args: str | Path) -> str:
    done = subprocess.run(
        [tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", *RULE_FILES)
    assert out.count("SUCCESS") == len(RULE_FILES)


def test_promtool_check_config() -> None:
    promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")


def test_promtool_rule_unit_tests() -> None:
    assert TESTS
    out = promtool("test", "rules", *TESTS)
    assert out.count("SUCCESS") == len(TESTS), out


def test_every_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested: dict[str, set[int]] = {}
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                tested.setdefault(check["alertname"], set()).add(len(check["exp_alerts"]))
    assert alerts, "no alert rules found"
    for alert in alerts:
        # Each alert is shown both firing and quiet.
        counts = tested.get(alert, set())
        assert 0 in counts and any(c > 0 for c in counts), f"{alert}: {counts}"


def test_job_matchers_name_scrape_jobs_of_the_config() -> None:
    """`job="..."` in the rules and the dashboard names a job of prometheus.yml (the Helm
    chart's PodMonitor/ServiceMonitor give the same job names; tests/chart checks it)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    dashboards = sorted((PROMETHEUS_DIR.parent / "grafana").glob("*.json"))
    used = {
        job
        for path in [*RULE_FILES, *dashboards]
        for job in re.findall(r'job\\?="([^"\\]+)"', path.read_text())
    }
    assert "batchserve" in used
    assert used <= jobs, used - jobs


def test_local_config_scrapes_the_ports_a_replacement_replica_takes() -> None:
    """`batchserve up` leaves Serve's port range at Ray's default (from 30000): Ray's own
    PortAllocator gives a replacement replica the next port while its predecessor's is
    quarantined. One replica and three replacements within the quarantine (or two replicas
    through a rolling restart) stay on ports the `batchserve` job scrapes; the config once
    listed only 30000."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import (
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
        RAY_SERVE_PORT_QUARANTINE_S,
    )
    from ray.serve._private.node_port_manager import PortAllocator

    assert RAY_SERVE_PORT_QUARANTINE_S > 0
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [c for c in config["scrape_configs"] if c["job_name"] == "batchserve"]
    scraped = [t for s in job["static_configs"] for t in s["targets"]]
    assert all(t.startswith("127.0.0.1:") for t in scraped)
    ports = {int(t.rsplit(":", 1)[1]) for t in scraped}

    def allocator() -> PortAllocator:
        return PortAllocator(
            RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
            RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
            RequestProtocol.HTTP,
            "local",
        )

    # One replica, replaced three times within 150 s.
    alloc = allocator()
    handed = [alloc.allocate("r0")]
    for i in range(1, 4):
        alloc.release(f"r{i - 1}", handed[-1])
        handed.append(alloc.allocate(f"r{i}"))
    # Two replicas through a rolling restart (each new one starts, then the old one stops).
    alloc = allocator()
    old = {r: alloc.allocate(r) for r in ("a", "b")}
    for r, port in old.items():
        handed += [old[r], alloc.allocate(f"{r}2")]
        alloc.release(r, port)
    assert set(handed) <= ports, sorted(set(handed) - ports)
    assert ports == set(range(30000, 30004))


def test_latency_quantiles_are_recorded_at_p50_p95_p99() -> None:
    """README: TTFT, inter-token and end-to-end latency p50/p95/p99 recording rules."""
    recorded: dict[str, set[str]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("record", "").endswith(":quantile_5m"):
                    quantile = rule["labels"]["quantile"]
                    assert f"histogram_quantile({quantile}," in rule["expr"], rule
                    recorded.setdefault(rule["record"], set()).add(quantile)
    for metric in ("time_to_first_token", "inter_token_latency", "request_duration"):
        record = f"model:batchserve_{metric}_seconds:quantile_5m"
        assert recorded.get(record) == {"0.5", "0.95", "0.99"}, record


# `absent(name{job="..."})`, the whole expression of an alert.
ABSENT = re.compile(r'^absent\(([a-zA-Z_:][\w:]*)\{job="([^"]+)"\}\)$')


def test_absent_alert_watches_a_series_each_replica_serves_from_its_start(tmp_path: Path) -> None:
    """BatchserveMetricsAbsent is quiet only while its series exists: it must be one a
    replica's /metrics serves before any request (a counter child created on first use
    would page an idle, healthy service), scraped by the job of the replica ports."""
    from fastapi.testclient import TestClient

    from serve.cluster import build_gateway
    from tests.fakes import FakeEngine
    from tests.gateway.conftest import gateway_settings

    watched = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                match = ABSENT.match(" ".join(str(rule.get("expr", "")).split()))
                if "alert" in rule and match:
                    watched[rule["alert"]] = (match[1], match[2])
    assert watched.pop("BatchserveRayMetricsAbsent") == (RAY_ABSENT_SERIES, "ray")
    assert "BatchserveMetricsAbsent" in watched
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    replica_jobs = {
        c["job_name"]
        for c in config["scrape_configs"]
        for s in c["static_configs"]
        if "127.0.0.1:30000" in s["targets"]
    }
    assert replica_jobs == {"batchserve"}
    app = build_gateway(gateway_settings(cache_dir=str(tmp_path / "cache")), FakeEngine())
    with TestClient(app) as client:
        exposition = client.get("/metrics").text
    for alert, (name, job) in watched.items():
        assert job in replica_jobs, alert
        assert re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ", exposition, re.MULTILINE), (
            f"{alert}: {name} is not on a fresh replica's /metrics"
        )


RAY_ABSENT_SERIES = "ray_serve_deployment_replica_healthy"


def test_ray_absent_alert_watches_the_series_the_ray_alerts_read() -> None:
    """BatchserveRayMetricsAbsent watches job="ray" through a series the other Ray-based
    alerts read (its absence is theirs going blind) and Ray's Serve controller declares
    itself (Ray adds the `ray_` prefix), on the `ray` scrape job."""
    from ray.serve._private import deployment_state

    rules = alert_rules()
    (absent,) = [r for r in rules if r["alert"] == "BatchserveRayMetricsAbsent"]
    assert ABSENT.match(absent["expr"].strip()), absent["expr"]
    assert absent["expr"].strip() == f'absent({RAY_ABSENT_SERIES}{{job="ray"}})'
    assert absent["labels"]["severity"] == "ticket"
    readers = {r["alert"] for r in rules if RAY_ABSENT_SERIES in r["expr"]} - {absent["alert"]}
    assert {"BatchserveServeReplicaUnhealthy", "BatchserveReplicasNotScraped"} <= readers
    source = Path(deployment_state.__file__).read_text()
    assert f'"{RAY_ABSENT_SERIES.removeprefix("ray_")}"' in source
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [c for c in config["scrape_configs"] if c["job_name"] == "ray"]
    assert [t for s in job["static_configs"] for t in s["targets"]] == ["127.0.0.1:8080"]
