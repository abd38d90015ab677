"""SIGTERM to `batchserve up` with streams in flight (issue 9's graceful drain): it deletes
the application first, so HAProxy keeps carrying the streams while the replica drains,
refuses new requests with 503/3040, ends a stream that outlasts the drain budget with an
error event, soft-stops HAProxy, then stops everything it started.

Before, Ray's own SIGTERM handler (installed by `ray.init`) killed the process at once:
every stream through HAProxy broke within 0.1 s, with no error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.cluster.conftest import Cluster, running_cluster
from tests.cluster.test_overload_drain import AUTH, LONG, LONG_PROMPTS, RUN_PATH, Stream, stream

pytestmark = pytest.mark.cluster

# Short enough that the long stream (1,900 greedy tokens, 6.6 s from start to end alone
# on an idle 2-vCPU machine, more often longer) outlasts it: the drain deadline comes
# budget - 1 s after the replica sees the drain, about 1.2 s after the signal.
GRACEFUL_SHUTDOWN_S = 4.0
EXIT_WITHIN_S = GRACEFUL_SHUTDOWN_S + 40


@dataclass
class Stopped:
    long: Stream
    short: Stream
    # (seconds after the signal, status or transport error, body)
    probes: list[tuple[float, int | str, str]] = field(default_factory=list)
    exited_after_s: float | None = None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def sigterm_under_streams(cluster: Cluster) -> Stopped:
    url = cluster.url + RUN_PATH
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as http:
        long = asyncio.create_task(stream(http, url, {**LONG, "prompt": LONG_PROMPTS[0]}))
        await asyncio.sleep(0.5)  # the long stream is under way
        short = asyncio.create_task(stream(http, url, {"prompt": "Count to 5.", "max_tokens": 32}))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        os.kill(cluster.pid, signal.SIGTERM)
        out = Stopped(long=Stream(), short=Stream())
        while not _gone(cluster.pid) and time.monotonic() - t0 < EXIT_WITHIN_S:
            at = round(time.monotonic() - t0, 2)
            try:
                r = await http.post(url, headers=AUTH, json={"prompt": "hi", "max_tokens": 4})
                out.probes.append((at, r.status_code, r.text[:300]))
            except httpx.TransportError as exc:
                out.probes.append((at, type(exc).__name__, ""))
            await asyncio.sleep(0.25)
        if _gone(cluster.pid):
            out.exited_after_s = time.monotonic() - t0
        out.long, out.short = await long, await short
        for s in (out.long, out.short):
            assert s.ended_at is not None
            s.ended_at -= t0  # seconds after the signal, from here on
        return out


def test_sigterm_drains_the_replicas_then_stops(
    tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"BATCHSERVE_GRACEFUL_SHUTDOWN_TIMEOUT_S": str(GRACEFUL_SHUTDOWN_S)}
    work = tmp_path_factory.mktemp("shutdown")
    with running_cluster(tiny_qwen2_dir, work, replicas=1, env=env) as cluster:
        tree = psutil.Process(cluster.pid).children(recursive=True)
        stopped = asyncio.run(sigterm_under_streams(cluster))
        log = cluster.log.read_text(errors="replace")
    long, short = stopped.long, stopped.short
    print(
        f"\n[sigterm] exited_after_s={stopped.exited_after_s}; "
        f"long=({long.ended_at:.2f} s, {long.events} events, done={long.done}, "
        f"{long.transport or (long.error or '')[:120]}); short_completed={short.completed}; "
        f"probes={[(at, status) for at, status, _ in stopped.probes]}"
    )
    # The stream that started just before the signal finished normally.
    assert short.completed, (short.status, short.error, short.transport)
    # The long one ran on through HAProxy until the replica ended it, just before the
    # drain budget: the 3040 error event, then [DONE] (not a broken connection).
    assert long.transport is None and long.done and long.error is not None, long
    assert [e["code"] for e in json.loads(long.error)["errors"]] == [3040], long.error
    assert long.ended_at is not None
    assert GRACEFUL_SHUTDOWN_S - 3 <= long.ended_at <= GRACEFUL_SHUTDOWN_S + 1, long.ended_at
    # New requests: served until the drain began, then refused with 503/3040 in JSON
    # (the gateway's, or HAProxy's page once no application is deployed), until HAProxy
    # was soft-stopped after the drain: then connection refused. Never a bare close (a
    # `RemoteProtocolError`), which a request HAProxy held on a kept-alive connection got
    # when Serve's shutdown SIGKILLed HAProxy without that soft stop (2 of 4 runs).
    refused = 0
    for at, status, body in stopped.probes:
        if isinstance(status, str):
            assert at >= long.ended_at - 0.5, (at, status)  # only once the drain was over
            assert status == "ConnectError", (at, status)
            continue
        assert status in (200, 503), (at, status, body)
        if status == 503:
            refused += 1
            assert json.loads(body)["errors"][0]["code"] == 3040, body
    assert refused >= 5, stopped.probes
    # It drained, then stopped by itself, leaving nothing running.
    assert stopped.exited_after_s is not None, "batchserve up did not exit after SIGTERM"
    assert "draining the replicas" in log and "stopping batchserve ..." in log
    assert "interrupted" not in log
    _, alive = psutil.wait_procs(tree, timeout=30)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not alive, [p.pid for p in alive]
