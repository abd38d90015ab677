"""Gateway metrics on `/metrics` and the JSON access log, with the fake engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from serve.cluster import build_gateway
from serve.gateway.access_log import ACCESS_LOGGER
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, MODEL, RUN_URL, TOKEN
from tests.live_server import live

Labels = dict[str, str]


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **want: str
) -> float:
    """The sum of `name` over the series whose labels include `want`."""
    return sum(v for (n, labels), v in samples.items() if n == name and set(want.items()) <= labels)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_non_streaming_request_is_counted(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    prompt = "secret prompt text"
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": prompt, "max_tokens": 100})
    assert r.status_code == 200
    usage = r.json()["result"]["usage"]
    m = await scrape(client)
    base = {"model": MODEL, "plan": "default", "dialect": "workers_ai", "replica": "local"}
    assert value(m, "batchserve_requests_total", **base, stream="no", status_class="2xx") == 1
    assert value(m, "batchserve_generated_tokens_total", **base) == usage["completion_tokens"]
    assert value(m, "batchserve_prompt_tokens_total", **base) == usage["prompt_tokens"]
    # max_tokens 100 was clamped to the fixture's cap of 8.
    assert value(m, "batchserve_non_stream_clamps_total", model=MODEL) == 1
    assert value(m, "batchserve_time_to_first_token_seconds_count", stream="no") == 1
    assert value(m, "batchserve_inter_token_latency_seconds_count") == 1
    assert value(m, "batchserve_queue_wait_seconds_count") == 1
    assert value(m, "batchserve_request_duration_seconds_count", status_class="2xx") == 1
    assert value(m, "batchserve_inflight_requests", model=MODEL) == 0
    assert value(m, "batchserve_admission_limit_requests", model=MODEL) == 4
    # Every rejection reason exists from the start (rate() sees the first one).
    for reason in ("rate", "tokens", "concurrency", "queue_full", "capacity"):
        assert (
            "batchserve_rejections_total",
            frozenset({"model": MODEL, "reason": reason, "replica": "local"}.items()),
        ) in m

    (line,) = access_lines(caplog)
    assert line["request_id"] == r.headers["x-request-id"]
    assert line["inference_id"] == r.headers["cf-ai-req-id"]
    assert line["tenant_id"] == "t1"
    assert line["status"] == 200 and line["stream"] is False and line["clamped"] is True
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["ttft_ms"] <= line["duration_ms"]
    assert line["finish_reason"] == "length"
    text = json.dumps(line)
    assert prompt not in text and TOKEN not in text and "one two" not in text


async def test_streaming_and_openai_requests(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True})
    assert r.status_code == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}
    r = await client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 200
    usage = r.json()["usage"]
    m = await scrape(client)
    assert value(m, "batchserve_requests_total", dialect="workers_ai", stream="yes") == 1
    assert value(m, "batchserve_requests_total", dialect="openai", stream="no") == 1
    assert (
        value(m, "batchserve_generated_tokens_total", dialect="openai")
        == usage["completion_tokens"]
    )
    # n=2: the prompt is counted once, each choice is one generation.
    assert value(m, "batchserve_prompt_tokens_total", dialect="openai") == usage["prompt_tokens"]
    assert value(m, "batchserve_time_to_first_token_seconds_count", dialect="openai") == 2
    assert value(m, "batchserve_inflight_streams", model=MODEL) == 0


async def test_errors_are_counted_by_status_class(
    client: httpx.AsyncClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    r = await client.post(RUN_URL, headers={"Authorization": "Bearer nope"}, json={"prompt": "x"})
    assert r.status_code == 401
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": ""})
    assert r.status_code == 400
    engine.fail_after = 2
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "x", "stream": True})
    assert r.status_code == 200 and "3008" in r.text  # the failure came after the first byte
    m = await scrape(client)
    assert value(m, "batchserve_requests_total", plan="none", status_class="4xx") == 1
    assert value(m, "batchserve_requests_total", plan="default", status_class="4xx") == 1
    assert value(m, "batchserve_requests_total", stream="yes", status_class="5xx") == 1
    lines = access_lines(caplog)
    assert [line["status"] for line in lines] == [401, 400, 500]
    assert lines[0]["tenant_id"] is None and lines[0]["error_code"] == 10000
    assert lines[1]["error_code"] == 5006
    assert lines[2]["error_type"] == "EngineFailure"


async def test_queue_full_rejections(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.delay_s = 0.05
    body = {"prompt": "x", "max_tokens": 12}
    results = await asyncio.gather(
        *[client.post(RUN_URL, headers=AUTH, json=body) for _ in range(8)]
    )
    refused = sum(r.status_code == 429 for r in results)
    assert refused > 0
    m = await scrape(client)
    assert value(m, "batchserve_rejections_total", reason="queue_full") == refused
    assert value(m, "batchserve_rejections_total", reason="capacity") == 0
    assert value(m, "batchserve_requests_total", status_class="4xx") == refused


async def test_engine_metrics_are_served_with_the_replica_label(
    settings: Settings, engine: FakeEngine
) -> None:
    engine_registry = CollectorRegistry()
    Gauge("vllm:num_requests_running", "running", ["model_name"], registry=engine_registry).labels(
        MODEL
    ).set(3)
    app = build_gateway(settings, engine, replica_id="r-7", engine_metrics=engine_registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        m = await scrape(c)
    assert value(m, "vllm:num_requests_running", model_name=MODEL, replica="r-7") == 3
    assert value(m, "batchserve_admission_limit_requests", replica="r-7") == 4


async def test_log_prompts_debug_setting(
    settings: Settings, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    app = build_gateway(settings.model_copy(update={"log_prompts": True}), engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post(RUN_URL, headers=AUTH, json={"prompt": "abc", "raw": True})
    (line,) = access_lines(caplog)
    assert line["prompt_token_ids"] == [ord(ch) for ch in "abc"]
    assert line["output"] == r.json()["result"]["response"]


def test_client_disconnect_is_counted(settings: Settings) -> None:
    engine = FakeEngine(reply="one two three four five six", delay_s=0.2)
    with live(settings, engine) as base:
        with httpx.stream(
            "POST", base + RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True}
        ) as r:
            assert next(r.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 5
        while True:
            text = httpx.get(base + "/metrics").text
            families = {f.name: f for f in text_string_to_metric_families(text)}
            gone = sum(s.value for s in families["batchserve_client_disconnects"].samples)
            if gone == 1:
                break
            assert time.monotonic() < deadline, "the disconnect was never counted"
            time.sleep(0.05)
        requests = families["batchserve_requests"].samples
        assert [s.labels["status_class"] for s in requests if s.name.endswith("_total")] == ["4xx"]
        assert engine.aborted
