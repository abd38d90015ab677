"""Overload and slow clients (issue 9) against a real gateway process on the fake engine:
an open-loop burst of 10x capacity from the load tester, spread over several tenants, and
a client that trickles its request body. The admission bound across tenants is also
checked in process (`Gate`).

`python -m tests.gateway.test_overload [SECONDS]` runs a longer burst and prints the
figures RELIABILITY.md records.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from loadtest import client
from loadtest.metrics import percentile
from loadtest.records import RequestResult
from loadtest.schedule import Arrival, open_loop
from loadtest.targets import Dialect, Target
from loadtest.workloads import LengthDist, WordTokenizer, synthetic
from serve.errors import OutOfCapacity, TenantRateLimited
from serve.gateway.admission import Caller, Gate
from serve.gateway.fair_queue import FairQueue
from serve.gateway.ledger import ModelTotals, OpenRequest, UsageRecord
from serve.gateway.ratelimit import InMemoryRateLimiter
from serve.gateway.tenants import Tenant
from serve.tenants_cli import add_token
from tests import gateway_process
from tests.ports import free_port

pytestmark = pytest.mark.slow

MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
# The replica: 4 engine slots, each request holding one for 8 words x 0.1 s = 0.8 s, so
# capacity is 5 requests/s. At most 8 requests wait (all tenants together), 8 per tenant,
# none longer than 5 s.
CAPACITY = 4
WORD_DELAY_S = 0.1
HOLD_S = 8 * WORD_DELAY_S
QUEUE_TOTAL = 8
QUEUE_WAIT_S = 5.0
BODY_TIMEOUT_S = 1.0
SETTINGS = {
    "max_inflight_per_replica": CAPACITY,
    "queue_max_per_tenant": 8,
    "queue_max_total": QUEUE_TOTAL,
    "queue_max_wait_s": QUEUE_WAIT_S,
    "body_timeout_s": BODY_TIMEOUT_S,
}
# Four tenants share the burst: their own queues (4 x 8) could hold 32 requests, which
# would wait up to 32 / 4 x 0.8 = 6.4 s; only the bound across tenants keeps them short.
BURST_TENANTS = 4


@dataclass(frozen=True)
class Gateway:
    url: str
    pid: int
    tenants: tuple[tuple[str, str], ...]  # (token, account) per tenant

    def run_url(self, account: str) -> str:
        return f"{self.url}/client/v4/accounts/{account}/ai/run/{MODEL}"

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss) / 2**20


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("overload")) as gw:
        yield gw


@contextmanager
def running_gateway(work: Path) -> Iterator[Gateway]:
    """`uvicorn tests.tenancy_app:create_app` with the small limits above, 5 tenants."""
    tenants_file = work / "tenants.yaml"
    tenants = tuple(
        (add_token(tenants_file, tenant_id=f"t{i}", accounts=[f"acct-{i}"]), f"acct-{i}")
        for i in range(BURST_TENANTS + 1)
    )
    port = free_port()
    env = {
        "TENANCY_APP_DELAY_S": str(WORD_DELAY_S),
        "TENANCY_APP_SETTINGS": json.dumps(SETTINGS),
    }
    proc = gateway_process.start_gateway(work, tenants_file, port, env)
    try:
        url = f"http://127.0.0.1:{port}"
        yield Gateway(url, proc.pid, tenants)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class RssSampler:
    """The peak RSS of a process, sampled every 50 ms in a thread."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.peak_mb = gw.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self.gw.rss_mb())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def burst(gw: Gateway, seconds: float, factor: float = 10.0) -> list[RequestResult]:
    """`factor` x capacity (requests/s), open loop (Poisson), spread evenly over the burst
    tenants, each from its own load-tester client for `seconds`."""
    tenants = gw.tenants[:BURST_TENANTS]
    rate = factor * CAPACITY / HOLD_S / len(tenants)
    n = max(int(rate * seconds), 1)
    tok = WordTokenizer()

    def one(i: int) -> list[RequestResult]:
        token, account = tenants[i]
        target = Target(gw.url, Dialect.WORKERS_AI, MODEL, token=token, account=account)
        sessions = synthetic(tok, n, LengthDist.parse("8"), LengthDist.parse("8"), seed=i)
        load = open_loop(rate, n, Arrival.POISSON, seed=i)
        out = client.run(target, sessions, load, tokenizer=tok, timeout_s=60)
        return out.results

    with ThreadPoolExecutor(len(tenants)) as pool:
        return [r for part in pool.map(one, range(len(tenants))) for r in part]


def figures(results: Sequence[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    refused = [r for r in results if r.status == 429]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    refusal = [r.e2e_s for r in refused]

    def ms(xs: Sequence[float], p: float) -> float:
        return round(percentile(xs, p) * 1000, 1) if xs else float("nan")

    return {
        "requests": len(results),
        "completed": len(ok),
        "refused_429": len(refused),
        "other_errors": len(results) - len(ok) - len(refused),
        "refusal_ms_p50": ms(refusal, 50),
        "refusal_ms_p99": ms(refusal, 99),
        "refusal_ms_max": ms(refusal, 100),
        "ttft_ms_p50": ms(ttft, 50),
        "ttft_ms_p99": ms(ttft, 99),
        "ttft_ms_max": ms(ttft, 100),
    }


def inflight(gw: Gateway) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    values = re.findall(r"^batchserve_inflight_requests\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(v) for v in values)


def test_burst_of_10x_capacity_is_served_or_refused_at_once(gateway: Gateway) -> None:
    token, account = gateway.tenants[0]
    auth = {"Authorization": f"Bearer {token}"}
    warm = httpx.post(gateway.run_url(account), headers=auth, json={"prompt": "hi"}, timeout=10)
    assert warm.status_code == 200
    rss_before = gateway.rss_mb()
    with RssSampler(gateway) as first:
        results = burst(gateway, seconds=3.0)
    f = figures(results)
    print("burst 1:", f, f"rss before {rss_before:.1f} MB, peak {first.peak_mb:.1f} MB")

    # Every request was served in full or refused with 429/3040; nothing else.
    assert f["other_errors"] == 0, [r.error for r in results if not r.ok and r.status != 429]
    assert all(r.error is not None and '"code":3040' in r.error for r in results if r.status == 429)
    # Most of a 10x burst is excess, yet the replica kept serving at capacity throughout.
    assert f["refused_429"] >= len(results) // 2
    assert f["completed"] >= 0.5 * CAPACITY / HOLD_S * 3.0
    # Refused at once: no refusal waited for the queue's 5 s limit (the contract value);
    # without the bound across tenants the last of 32 queued requests would. Half the
    # limit leaves room for a loaded 2-core machine (seen: 1.04 s max, 9 ms p99).
    assert f["refusal_ms_max"] < QUEUE_WAIT_S * 1000 / 2, f
    # Admitted requests waited at most what the queue bounds allow.
    assert f["ttft_ms_max"] < QUEUE_WAIT_S * 1000, f

    # Afterwards: nothing left in flight, a request is served at once, memory is flat.
    deadline = time.monotonic() + 10
    while inflight(gateway) > 0:
        assert time.monotonic() < deadline, "requests still in flight after the burst"
        time.sleep(0.2)
    again = httpx.post(gateway.run_url(account), headers=auth, json={"prompt": "hi"}, timeout=10)
    assert again.status_code == 200
    rss_after_first = gateway.rss_mb()
    with RssSampler(gateway) as second:
        burst(gateway, seconds=3.0)
    while inflight(gateway) > 0:
        time.sleep(0.2)
    rss_after_second = gateway.rss_mb()
    print(
        f"rss after burst 1 {rss_after_first:.1f} MB, peak in burst 2 {second.peak_mb:.1f} MB,"
        f" after burst 2 {rss_after_second:.1f} MB"
    )
    # A second identical burst costs no more memory than the first left behind.
    assert rss_after_second - rss_after_first < 10, (rss_after_first, rss_after_second)


def test_refusal_carries_retry_after(gateway: Gateway) -> None:
    """20 requests at once: 4 start, 8 wait, the rest are refused at once, on the wire as
    429 with Retry-After and the Workers AI envelope with code 3040."""
    token, account = gateway.tenants[BURST_TENANTS]

    async def one(http: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        r = await http.post(
            gateway.run_url(account),
            headers={"Authorization": f"Bearer {token}"},
            json={"prompt": "hi", "stream": True},
        )
        return r, time.monotonic() - started

    async def all_at_once() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=20)) as h:
            return await asyncio.gather(*(one(h) for _ in range(20)))

    answers = asyncio.run(all_at_once())
    refused = [(r, t) for r, t in answers if r.status_code == 429]
    assert len(refused) == 20 - CAPACITY - QUEUE_TOTAL, [r.status_code for r, _ in answers]
    assert all(r.status_code == 200 for r, _ in answers if r.status_code != 429)
    for r, took in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["success"] is False and body["errors"][0]["code"] == 3040
        assert took < QUEUE_WAIT_S / 2  # refused at once, not after the queue limit


def _slow_body(address: tuple[str, int], path: str, token: str) -> tuple[bytes, float]:
    """Complete headers announcing a 64-byte body, then one body byte every 0.25 s.
    Returns what the server sent and when (s from the first body byte) it closed."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 64\r\n\r\n".encode()
        )
        start = time.monotonic()
        received = b""
        sock.settimeout(0.25)
        for _ in range(64):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
        return received, time.monotonic() - start


def test_trickled_body_is_cut_off_while_others_are_served(gateway: Gateway) -> None:
    """uvicorn alone has no timeout for a body in progress; the gateway's own is 1 s here."""
    token, account = gateway.tenants[0]
    host, port = gateway.url.removeprefix("http://").split(":")
    path = f"/client/v4/accounts/{account}/ai/run/{MODEL}"
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_slow_body, (host, int(port)), path, token)
        time.sleep(0.3)
        normal = httpx.post(
            gateway.run_url(account),
            headers={"Authorization": f"Bearer {token}"},
            json={"prompt": "hi"},
            timeout=10,
        )
        received, closed_after = slow.result()
    assert normal.status_code == 200
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b'"code":3007' in received
    assert closed_after < BODY_TIMEOUT_S + 2.0, closed_after  # 64 bytes would take 16 s


# -- the bound across tenants, in process --------------------------------------------------


class _NoLedger:
    async def open(self, entry: OpenRequest) -> None:
        return None

    async def record(self, record: UsageRecord) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def totals(self, account_id: str, since: float, until: float) -> list[ModelTotals]:
        return []

    async def close(self) -> None:
        return None


def _caller(tid: str) -> Caller:
    return Caller.of(Tenant(tid, frozenset({f"acct-{tid}"})), None, MODEL)


async def test_gate_refuses_at_once_when_the_queue_is_full_across_tenants() -> None:
    queue = FairQueue(
        1, max_queued_per_tenant=8, max_wait_s=30, retry_after_s=1, max_queued_total=2
    )
    gate = Gate(InMemoryRateLimiter(), queue, _NoLedger())

    async def admit(tid: str) -> Any:
        return await gate.admit(
            _caller(tid), f"r-{tid}", prompt_tokens=1, max_tokens=1, choices=1, headers_out={}
        )

    running = await admit("a")  # takes the only slot
    waiting = [asyncio.create_task(admit(t)) for t in ("b", "c")]
    await asyncio.sleep(0.01)
    assert queue.queued == 2
    for tid in ("d", "b"):  # a new tenant, and one that already waits
        started = time.monotonic()
        with pytest.raises(OutOfCapacity) as refused:
            await admit(tid)
        assert time.monotonic() - started < 0.5
        assert refused.value.status == 429 and refused.value.code == 3040
        assert refused.value.reason == "queue_full"
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    assert queue.queued == 2
    # The same answer before the body is read (one slot, as any request needs at least).
    for tid in ("d", "b"):
        with pytest.raises(OutOfCapacity):
            gate.refuse_early(tid)
    # A slot frees: "b" starts, the queue has room for one again.
    running.lease.release()
    second = await asyncio.wait_for(waiting[0], 1)
    gate.refuse_early("d")  # room again: no early refusal
    late = asyncio.create_task(admit("d"))
    await asyncio.sleep(0.01)
    assert queue.queued == 2 and not late.done()
    for task in (waiting[1], late):
        task.cancel()
    await asyncio.gather(waiting[1], late, return_exceptions=True)
    second.lease.release()
    assert queue.queued == 0


async def test_per_tenant_bound_still_applies_below_the_total() -> None:
    queue = FairQueue(
        1, max_queued_per_tenant=1, max_wait_s=30, retry_after_s=1, max_queued_total=100
    )
    gate = Gate(InMemoryRateLimiter(), queue, _NoLedger())

    async def admit(tid: str) -> Any:
        return await gate.admit(
            _caller(tid), f"r-{tid}", prompt_tokens=1, max_tokens=1, choices=1, headers_out={}
        )

    gate.refuse_early("a")  # a free slot
    running = await admit("a")
    gate.refuse_early("a")  # may still queue
    waiting = asyncio.create_task(admit("a"))
    await asyncio.sleep(0.01)
    with pytest.raises(TenantRateLimited):
        await admit("a")
    with pytest.raises(TenantRateLimited):
        gate.refuse_early("a")
    gate.refuse_early("b")  # another tenant may queue
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    running.lease.release()


def main(argv: list[str]) -> int:
    """A longer burst for RELIABILITY.md: figures and RSS before, peak during, after."""
    import tempfile

    seconds = float(argv[0]) if argv else 20.0
    with tempfile.TemporaryDirectory() as tmp, running_gateway(Path(tmp)) as gw:
        token, account = gw.tenants[0]
        httpx.post(
            gw.run_url(account), headers={"Authorization": f"Bearer {token}"},
            json={"prompt": "hi"}, timeout=10,
        )  # fmt: skip
        before = gw.rss_mb()
        started = time.monotonic()
        with RssSampler(gw) as sampler:
            results = burst(gw, seconds)
        wall = time.monotonic() - started
        while inflight(gw) > 0:
            time.sleep(0.2)
        time.sleep(1)
        after = gw.rss_mb()
        print(
            json.dumps(
                {
                    **figures(results),
                    "burst_s": seconds,
                    "wall_s": round(wall, 1),
                    "rss_mb": {
                        "before": round(before, 1),
                        "peak": round(sampler.peak_mb, 1),
                        "after": round(after, 1),
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


async def test_a_background_task_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A settlement runs in a task of the gate's (`Gate.background`) that a cancelled caller
    no longer awaits: its failure is logged, not left to asyncio's 'exception was never
    retrieved' at garbage collection."""
    queue = FairQueue(1, max_queued_per_tenant=1, max_wait_s=1.0)
    gate = Gate(InMemoryRateLimiter(), queue, _NoLedger())

    async def fails() -> None:
        raise RuntimeError("ledger gone")

    task = asyncio.get_running_loop().create_task(fails(), name="settle-req-1")
    gate.background(task)
    await asyncio.wait([task])
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    (logged,) = [r for r in caplog.records if "settle-req-1" in r.getMessage()]
    assert logged.levelname == "ERROR" and logged.exc_info is not None
