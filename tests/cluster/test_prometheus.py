"""Observability on the real stack: each replica's /metrics (gateway + vLLM engine metrics,
replica-labelled), scraped by a real Prometheus with our rules, whose tokens/sec recording
rule must agree with the tokens this test counted itself."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import MODEL, Cluster
from tests.prometheus_server import RULE_FILES, PrometheusServer, prometheus

pytestmark = pytest.mark.cluster

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "batchserve.json"
VLLM_NAME = re.compile(r"vllm:[a-z_]+")
# The rule window (rate[1m]) and how long Prometheus must have scraped before it is full.
WINDOW_S = 60.0
LOAD_S = 15.0


def replica_families(url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


def vllm_names_we_use() -> set[str]:
    """Every vllm:* name the rules and the dashboard read (without _total/_bucket)."""
    text = DASHBOARD.read_text() + "".join(p.read_text() for p in RULE_FILES)
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in VLLM_NAME.findall(text)}


def test_each_replica_serves_gateway_and_engine_metrics(cluster: Cluster) -> None:
    # One request through each replica so per-request series exist everywhere.
    request_ids = []
    for url in cluster.replica_urls:
        r = httpx.post(
            url + urlsplit(cluster.run_url).path,
            headers=cluster.auth,
            json={"prompt": "a private prompt", "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        request_ids.append(r.headers["x-request-id"])
    replicas = set()
    for url in cluster.replica_urls:
        families = replica_families(url)
        (limit,) = families["batchserve_admission_limit_requests"]
        replica = limit[1]["replica"]
        assert replica and replica != "local"
        replicas.add(replica)
        for name in vllm_names_we_use() | {
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits",
            "vllm:generation_tokens",
            "vllm:time_to_first_token_seconds",
            "vllm:request_time_per_output_token_seconds",
        }:
            assert name in families, f"{url}: no {name} in /metrics"
            assert all(labels.get("replica") == replica for _, labels, _ in families[name])
        generated = sum(
            v
            for n, labels, v in families["vllm:generation_tokens"]
            if n.endswith("_total") and labels.get("model_name") == MODEL
        )
        assert generated >= 1, "the engine counted no generated tokens"
    assert len(replicas) == len(cluster.replica_urls)
    # Each request left one JSON access log line in its replica's log (forwarded to `up`'s).
    deadline = time.monotonic() + 30
    while True:
        lines = access_lines(cluster.log)
        logged = {line["request_id"]: line for line in lines}
        if all(rid in logged for rid in request_ids):
            break
        assert time.monotonic() < deadline, f"no access log lines for {request_ids}"
        time.sleep(1)
    for rid in request_ids:
        line = logged[rid]
        assert line["status"] == 200 and line["tenant_id"] == "dev"
        assert line["replica"] in replicas and line["completion_tokens"] >= 1
        assert line["ttft_ms"] > 0 and line["duration_ms"] >= line["ttft_ms"]
    assert not any("a private prompt" in json.dumps(line) for line in lines)


def access_lines(log: Path) -> list[dict[str, object]]:
    out = []
    for raw in log.read_text(errors="replace").splitlines():
        start = raw.find('{"ts":')
        if start >= 0 and '"event":"request"' in raw:
            out.append(json.loads(raw[start:]))
    return out


def wait_for(prom: PrometheusServer, expr: str, want: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(prom.query(expr)) < want:
        assert time.monotonic() < deadline, f"{expr}: fewer than {want} series"
        time.sleep(0.5)


def one_request(cluster: Cluster, i: int) -> int:
    """A request of the mix (Workers AI streaming / not, OpenAI); its completion tokens."""
    if i % 3 == 2:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"tell me {i}"}],
            "max_tokens": 24,
        }
        r = httpx.post(f"{cluster.url}/v1/chat/completions", headers=cluster.auth, json=body,
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["completion_tokens"])
    body = {"prompt": f"count to {i}", "max_tokens": 24, "stream": i % 3 == 0}
    if not body["stream"]:
        r = httpx.post(cluster.run_url, headers=cluster.auth, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return int(r.json()["result"]["usage"]["completion_tokens"])
    usage = None
    with httpx.stream("POST", cluster.run_url, headers=cluster.auth, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                usage = event.get("usage", usage)
    assert usage is not None
    return int(usage["completion_tokens"])


def test_recorded_tokens_per_second_matches_counted_tokens(
    cluster: Cluster, tmp_path: Path
) -> None:
    targets = [urlsplit(u).netloc for u in cluster.replica_urls]
    scrape = [{"job_name": "batchserve", "static_configs": [{"targets": targets}]}]
    with prometheus(tmp_path / "prom", scrape_configs=scrape, interval="1s") as prom:
        started = time.time()
        wait_for(prom, 'up{job="batchserve"} == 1', len(targets))
        # Every replica's per-request series exists before the window (warm-up, through
        # each replica's own port), so the rule sees every later token as an increase.
        for url in cluster.replica_urls:
            r = httpx.post(
                url + urlsplit(cluster.run_url).path,
                headers=cluster.auth,
                json={"prompt": "warm up", "max_tokens": 4},
                timeout=120,
            )
            assert r.status_code == 200, r.text
        wait_for(prom, "batchserve_generated_tokens_total", len(targets))
        wait_for(prom, "replica:vllm_requests_running:sum", len(targets))
        # The rule's 1m window must be fully scraped when it is read (no extrapolation
        # over a gap): start the load so that it ends a little after that point.
        time.sleep(max(0.0, started + WINDOW_S - LOAD_S - time.time()))
        load_start = time.time()
        counted = 0
        with ThreadPoolExecutor(max_workers=4) as pool:
            i = 0
            while time.time() - load_start < LOAD_S:
                batch = [pool.submit(one_request, cluster, i + k) for k in range(4)]
                counted += sum(f.result() for f in batch)
                i += 4
        load_end = time.time()
        # Read the rule at a moment whose 1m window holds the whole load and was scraped
        # throughout: two scrapes plus one evaluation after the last token.
        at = max(load_end + 3.0, started + WINDOW_S + 2.0)
        assert at - WINDOW_S < load_start - 1.0, "load started before the window"
        time.sleep(max(0.0, at + 1.0 - time.time()))
        (sample,) = prom.query("batchserve:generated_tokens:rate1m", at=at)
        recorded_tokens = float(sample["value"][1]) * WINDOW_S
        assert counted > 0
        assert abs(recorded_tokens - counted) <= 0.10 * counted, (recorded_tokens, counted)

        # The other rules over the same data: both replicas' saturation, request rate.
        assert len(prom.query("replica:batchserve_admission:saturation", at=at)) == len(targets)
        (requests,) = prom.query('sum(model:batchserve_requests:rate1m{status_class="2xx"})', at=at)
        assert float(requests["value"][1]) > 0
        (errors,) = prom.query("max(model:batchserve_request_errors:ratio_rate5m)", at=at)
        assert float(errors["value"][1]) == 0.0
        print(f"tokens counted {counted}, recorded {recorded_tokens:.0f} over the 1m window")
