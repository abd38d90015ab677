"""Real vLLM behind the real Serve application: answers, determinism, streaming,
aborts on disconnect, and traffic spread over both replicas."""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.cluster.conftest import ACCOUNT, MODEL, Cluster, replica_actors

pytestmark = pytest.mark.cluster

PROMPTS = ["Tell me about the sea.", "What is a fox?", "Count to ten.", "hello world"]


def stream_events(response: httpx.Response) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    saw_done = False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        if data == "[DONE]":
            saw_done = True
            continue
        events.append(json.loads(data))
    assert saw_done
    return events


def run(cluster: Cluster, body: dict[str, object]) -> dict[str, object]:
    r = httpx.post(cluster.run_url, headers=cluster.auth, json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    payload = r.json()
    assert payload["success"] is True
    result: dict[str, object] = payload["result"]
    return result


def stream_text(cluster: Cluster, body: dict[str, object]) -> tuple[str, list[dict[str, object]]]:
    with httpx.stream(
        "POST", cluster.run_url, headers=cluster.auth, json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = stream_events(r)
    text = "".join(str(e["response"]) for e in events)
    return text, events


def test_non_streaming_answer(cluster: Cluster) -> None:
    result = run(cluster, {"prompt": "Tell me a story.", "max_tokens": 16})
    usage = result["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(result["response"], str)


def test_messages_streaming_answer(cluster: Cluster) -> None:
    body = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 12}
    _, events = stream_text(cluster, body)
    assert all(isinstance(e["response"], str) for e in events)
    final = events[-1]
    assert final["response"] == ""
    usage = final["usage"]
    assert isinstance(usage, dict) and 0 < usage["completion_tokens"] <= 12


def test_greedy_is_deterministic_and_stream_matches(cluster: Cluster) -> None:
    body = {"prompt": "Tell me about the fox.", "max_tokens": 24, "temperature": 0}
    first = run(cluster, body)
    second = run(cluster, body)
    assert first["response"] == second["response"]
    streamed, events = stream_text(cluster, body)
    assert streamed == first["response"]
    assert events[-1]["usage"] == first["usage"]


def test_two_replicas_serve_traffic(cluster: Cluster) -> None:
    before = [httpx.get(f"{r}/healthz").json()["requests_started"] for r in cluster.replica_urls]
    # Overlapping requests on separate connections, as many clients would send them:
    # HAProxy balances connections (leastconn), so both replicas must get some.
    bodies = [{"prompt": f"Say something {i}", "max_tokens": 8} for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(
            pool.map(
                lambda b: httpx.post(cluster.run_url, headers=cluster.auth, json=b, timeout=120),
                bodies,
            )
        )
    assert [r.status_code for r in statuses] == [200] * 8
    after = [httpx.get(f"{r}/healthz").json()["requests_started"] for r in cluster.replica_urls]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 8
    assert all(n > 0 for n in served), served


def unfinished(cluster: Cluster) -> int:
    return sum(
        int(httpx.get(f"{r}/healthz").json()["engine_unfinished_requests"])
        for r in cluster.replica_urls
    )


def test_disconnect_aborts_engine_request(cluster: Cluster) -> None:
    """A client that goes away mid-stream frees its engine request at once.

    Greedy decoding is deterministic, so the same request run to completion shows
    how long the engine would have kept it: the abort must end it far sooner.
    """
    long_body: dict[str, object] | None = None
    full_s = 0.0
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 1500, "temperature": 0}
        t0 = time.monotonic()
        _, events = stream_text(cluster, body)
        full_s = time.monotonic() - t0
        if events[-1].get("finish_reason") == "length":
            long_body = body
            break
    assert long_body is not None, "every probe prompt stopped early; pick longer ones"
    assert unfinished(cluster) == 0

    with httpx.stream(
        "POST",
        cluster.run_url,
        headers=cluster.auth,
        json={**long_body, "stream": True},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
        assert unfinished(cluster) == 1
        t_close = time.monotonic()
    # Leaving the block closes the connection mid-stream.
    while unfinished(cluster) != 0:
        assert time.monotonic() - t_close < full_s / 2, "engine request was not aborted"
        time.sleep(0.05)
    aborted_after = time.monotonic() - t_close
    assert aborted_after < full_s / 2


@pytest.mark.parametrize(
    "extremes",
    [
        {"seed": 9999999999, "temperature": 5, "top_p": 2, "top_k": 50},
        {"seed": 1, "temperature": 0, "top_p": 0, "top_k": 1},
        {"repetition_penalty": 0, "frequency_penalty": 2, "presence_penalty": 2},
        {"repetition_penalty": 2, "frequency_penalty": 0, "presence_penalty": 0},
    ],
)
def test_schema_legal_extremes_reach_the_engine(
    cluster: Cluster, extremes: dict[str, object]
) -> None:
    """Every value the schema allows is served by real vLLM, never a 4xx/5xx."""
    result = run(cluster, {"prompt": "Hello", "max_tokens": 4, **extremes})
    assert isinstance(result["response"], str)


def test_seeded_sampling_is_reproducible(cluster: Cluster) -> None:
    body = {"prompt": "Tell me a story.", "max_tokens": 16, "temperature": 1.0, "seed": 42}
    assert run(cluster, body)["response"] == run(cluster, body)["response"]


def serve_replica_logs(cluster: Cluster) -> dict[int, list[Path]]:
    """The Serve log files each replica actor process has open (pid -> paths)."""
    logs: dict[int, list[Path]] = {}
    for pid in replica_actors(cluster):
        with contextlib.suppress(psutil.Error):
            files = [Path(f.path) for f in psutil.Process(pid).open_files()]
            logs[pid] = [f for f in files if f.name.startswith("replica_")]
    return logs


def test_serve_keeps_writing_each_replicas_log(cluster: Cluster) -> None:
    """Serve logs one line per request to the replica's log file, through a MemoryHandler.
    vLLM's logging setup used to close that handler at engine start: from then on it kept
    every record in memory (about 2 KB a request, never freed; the replica actor grew
    5-6 MB per 10x burst) and the file got none. Each replica must still have its log open
    and see the requests it serves."""
    before = serve_replica_logs(cluster)
    assert len(before) == 2 and all(len(paths) == 1 for paths in before.values()), before
    sizes = {pid: paths[0].stat().st_size for pid, paths in before.items()}
    for url in cluster.replica_urls:
        for _ in range(3):
            r = httpx.post(
                f"{url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}",
                headers=cluster.auth,
                json={"prompt": "hi", "max_tokens": 2},
                timeout=60,
            )
            assert r.status_code == 200

    def tail(pid: int) -> str:
        return before[pid][0].read_bytes()[sizes[pid] :].decode(errors="replace")

    for _ in range(100):  # the file is written as records come, but give a loaded CI time
        if all(tail(pid).count("POST /client/v4/accounts/") >= 3 for pid in before):
            break
        time.sleep(0.1)
    for pid in before:
        assert tail(pid).count("POST /client/v4/accounts/") >= 3, (pid, tail(pid)[-500:])


def test_engines_run_without_onednns_global_primitive_cache(cluster: Cluster) -> None:
    """oneDNN's process-wide primitive cache grew each CPU engine by 160-220 MB over 8 load
    bursts (flat without it; RELIABILITY.md): every engine process the replicas started
    (EngineCore, Worker) runs with it off."""
    engines = [
        child
        for pid in replica_actors(cluster)
        for child in psutil.Process(pid).children(recursive=True)
    ]
    assert len(engines) >= 2 * len(cluster.replica_urls), engines
    for proc in engines:
        with contextlib.suppress(psutil.NoSuchProcess):
            env = proc.environ()
            assert env.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == "0", (proc.pid, proc.name())
