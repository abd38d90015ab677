"""`make bench`'s arithmetic: ratios to bare vLLM taken within a round for every stack, the
table's columns, and CPU accounting by process kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from loadtest import cpu_share, report
from loadtest.bench import aggregate, cpu_rows, table
from loadtest.metrics import summarize
from tests.loadtest.test_metrics import result


def _summary(tps: float, ttft: float = 10.0, cpu: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "output_token_throughput_tps": tps,
        "ms": {"ttft": {"p50": ttft, "p99": 2 * ttft}, "itl": {"p50": 1.5}},
        "errors": 0,
        "output_length": {"realised_mean": 64.0},
        "client": {"client_bound": False},
        "output_tokens": 1000,
        "duration_s": 2.0,
        "cpu_s": cpu or {},
        "cpu_s_other_stacks": 0.2,
    }


def _runs() -> list[dict[str, Any]]:
    # round 0: the machine is fast; round 1: twice as slow for everybody; round 2 like round 0
    tps = {"batchserve": 800.0, "bare vLLM": 1000.0, "Ray Serve LLM": 500.0,
           "Ray Serve LLM direct": 900.0}  # fmt: skip
    runs = []
    for rnd, speed in enumerate((1.0, 0.5, 1.0)):
        for name, t in tps.items():
            cpu = {"VLLM::EngineCore": 1.0 * speed, "ray::ServeController": 0.1}
            runs.append({"round": rnd, "stack": name, "streams": 32,
                         "summary": _summary(t * speed, cpu=cpu)})  # fmt: skip
    return runs


def test_every_stack_gets_its_ratio_to_bare_vllm_within_each_round() -> None:
    rows = aggregate(_runs())
    by = {r["stack"]: r for r in rows}
    assert set(by) == {"batchserve", "bare vLLM", "Ray Serve LLM", "Ray Serve LLM direct"}
    assert by["batchserve"]["ratio"]["median"] == 0.8
    assert by["batchserve"]["ratio"]["min"] == by["batchserve"]["ratio"]["max"] == 0.8
    assert by["Ray Serve LLM"]["ratio"]["median"] == 0.5
    assert by["batchserve"]["tps"]["median"] == 800.0
    text = table(rows)
    head = text.splitlines()[0]
    assert head.startswith("| stack | streams | output tok/s | vs bare vLLM | TTFT p50 ms "
                           "| TTFT p99 ms | ITL p50 ms |")  # fmt: skip
    assert "| Ray Serve LLM direct | 32 | 900 | 0.90x | 10 | 20 | 1.5 |" in text


def test_cpu_per_token_is_split_by_process_kind() -> None:
    rows = {r["stack"]: r for r in cpu_rows(_runs())}
    bs = rows["batchserve"]
    assert dict(bs["by_process"]) == {"VLLM::EngineCore": 1.0, "ray::ServeController": 0.1}
    assert abs(bs["cpu_ms_per_token"] - 1.1) < 1e-9
    assert bs["other_stacks_cpu_cores"] == 0.1


def test_process_labels_are_short_and_bounded() -> None:
    assert cpu_share.label(["ray::ServeReplica:batchserve:batchserve"]) == "ray::ServeReplica"
    assert cpu_share.label(["ray::ServeController"]) == "ray::ServeController"
    assert cpu_share.label(["/x/bin/haproxy", "-db", "-f", "cfg"]) == "haproxy"
    assert cpu_share.label(["/v/bin/python", "-m", "serve.cli", "up"]) == "python -m serve.cli"
    assert cpu_share.label(["/v/bin/python3", "-u", "/r/log_monitor.py", "--x"]) == (
        "python log_monitor.py"
    )


def test_cpu_spent_by_a_child_process_is_counted() -> None:
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    before = cpu_share.snapshot(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", code + "time.sleep(5)"])
    try:
        time.sleep(1.5)
        spent = cpu_share.spent(before, cpu_share.snapshot(os.getpid()))
    finally:
        child.kill()
        child.wait()
    assert spent.get("python -c", 0.0) >= 0.25


def test_frozen_stops_a_whole_process_tree_and_resumes_it() -> None:
    import psutil

    from loadtest.bench import Stack, frozen
    from loadtest.targets import Dialect, Target

    # A parent with a child, both busy: the stack's root and a descendant.
    loop = "import time\nwhile True: time.sleep(0.001)"
    spawn = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {loop!r}])\n{loop}"
    root = subprocess.Popen([sys.executable, "-c", spawn])
    try:
        top = psutil.Process(root.pid)
        deadline = time.monotonic() + 10
        while not top.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = top.children()
        stack = Stack("x", Target("http://127.0.0.1:1", Dialect.OPENAI_CHAT, "m"), "", root.pid)
        with frozen([stack], settle_s=0.2):
            assert top.status() == psutil.STATUS_STOPPED
            assert child.status() == psutil.STATUS_STOPPED
        assert top.status() != psutil.STATUS_STOPPED
        assert child.status() != psutil.STATUS_STOPPED
    finally:
        for p in psutil.Process(root.pid).children(recursive=True):
            p.kill()
        root.kill()
        root.wait()


def test_a_burst_without_successes_does_not_lose_the_run() -> None:
    """Every request of a burst failed (no TTFT/ITL figures at all), and the reference stack
    once delivered 0 tok/s: the rows, the table and the results document still come out."""
    failed = summarize([result(i, error="HTTP 503: busy", status=503) for i in range(4)])
    assert "p50" not in failed["ms"]["ttft"]
    failed["client"] = {"client_bound": False}
    runs = [
        {"round": 0, "stack": "bare vLLM", "streams": 8, "summary": failed},
        {"round": 0, "stack": "batchserve", "streams": 8, "summary": _summary(500.0)},
        {"round": 1, "stack": "bare vLLM", "streams": 8, "summary": _summary(1000.0)},
        {"round": 1, "stack": "batchserve", "streams": 8, "summary": failed},
    ]
    by = {r["stack"]: r for r in aggregate(runs)}
    vllm, bs = by["bare vLLM"], by["batchserve"]
    assert vllm["tps"]["median"] == 500.0 and vllm["errors"] == 4
    assert vllm["ttft_p50_ms"] == 10.0 and vllm["realised_output_mean"] == 64.0  # the good one
    # round 0: the reference at 0 tok/s gives no ratio; round 1: batchserve at 0 / 1000
    assert bs["ratio"] == {"median": 0.0, "min": 0.0, "max": 0.0, "n": 1}
    only_failed = aggregate([{"round": 0, "stack": "bare vLLM", "streams": 8, "summary": failed}])
    row = only_failed[0]
    assert row["ttft_p50_ms"] is None and row["itl_p50_ms"] is None and row["ratio"] is None
    assert row["realised_output_mean"] is None
    assert "| bare vLLM | 8 | 0 | - | - | - | - |" in table(only_failed)
    json.loads(report.dumps({"rows": only_failed, "runs": [failed]}))
