"""Calibration against the mock server in its own process: how close the measured TTFT and
per-token ITL come to what the mock was told, and what the client path itself costs.

TTFB (request sent -> first byte) is the cost of the client, the kernel and the mock's HTTP
handling before the mock starts its TTFT clock, so `ttft - ttfb` isolates the timing accuracy;
the first wave of requests (connection set-up) is left out at high stream counts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loadtest import client
from loadtest.metrics import percentile, summarize
from loadtest.schedule import ClosedLoop
from loadtest.targets import Dialect, Target
from loadtest.workloads import Session, UserTurn


@contextmanager
def mock_process(ttft_ms: float, itl_ms: float, tokens_per_chunk: int = 1) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loadtest", "mock", "--port", str(port),
           "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
           "--tokens-per-chunk", str(tokens_per_chunk)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            req = urllib.request.Request(
                f"{url}/v1/completions", data=b'{"max_tokens": 1}', method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the mock server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def calibrate(
    url: str,
    streams: int,
    requests: int,
    ttft_ms: float,
    itl_ms: float,
    tokens: int = 8,
    dialect: Dialect = Dialect.OPENAI_CHAT,
) -> dict[str, Any]:
    turn = UserTurn("the sea", 2, tokens)
    out = client.run(
        Target(url, dialect, "m"), [Session(i, (turn,)) for i in range(requests)],
        ClosedLoop(streams),
    )  # fmt: skip
    warm = out.results[streams:] if streams > 1 and requests > streams else out.results
    s = summarize(warm)
    net = [r.ttft_s - r.ttfb_s for r in warm if r.ttft_s is not None and r.ttfb_s is not None]
    ttft_net = percentile(net, 50) * 1e3
    return {
        "streams": streams,
        "requests_measured": len(warm),
        "errors": sum(not r.ok for r in out.results),
        "ttft_told_ms": ttft_ms,
        "ttft_p50_ms": s["ms"]["ttft"]["p50"],
        "ttft_minus_ttfb_p50_ms": ttft_net,
        "ttft_error": ttft_net / ttft_ms - 1,
        "itl_told_ms": itl_ms,
        "itl_p50_ms": s["ms"]["itl"]["p50"],
        "itl_error": s["ms"]["itl"]["p50"] / itl_ms - 1,
        "client_overhead_ttfb_p50_ms": s["ms"]["ttfb"]["p50"],
        "client": out.monitor,
    }
