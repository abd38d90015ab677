"""The load generator: aiohttp on uvloop, optional worker processes, a self-monitor.

The hot path only stamps `perf_counter_ns()` (CLOCK_MONOTONIC, comparable across processes)
and keeps each read's bytes; `records.parse` does the rest after the run. A monitor task
measures the event loop's lag and the process's CPU; a lagging loop marks the run
"client-bound" (its latencies then include the client's own delay).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import aiohttp
import psutil

from loadtest.metrics import percentile
from loadtest.records import RawRecord, RequestResult, parse
from loadtest.schedule import ClosedLoop, Delivery, LoadModel, OpenLoop, check_delivery
from loadtest.targets import Target, Turn
from loadtest.workloads import Session, Tokenizer

T = TypeVar("T")
READ_BUFSIZE = 4 * 1024 * 1024
MONITOR_INTERVAL_S = 0.01
LAG_P99_LIMIT_MS = 25.0
CPU_LIMIT_PERCENT = 90.0


@dataclass
class Progress:
    sent: int = 0
    done: int = 0
    errors: int = 0
    reads: int = 0

    def add(self, other: Progress) -> None:
        self.sent += other.sent
        self.done += other.done
        self.errors += other.errors
        self.reads += other.reads


@dataclass
class Monitor:
    lags_ms: list[float] = field(default_factory=list)
    cpu_percent: float = 0.0

    def summary(self) -> dict[str, Any]:
        p99 = percentile(self.lags_ms, 99) if self.lags_ms else 0.0
        return {
            "loop_lag_p50_ms": percentile(self.lags_ms, 50) if self.lags_ms else 0.0,
            "loop_lag_p99_ms": p99,
            "loop_lag_max_ms": max(self.lags_ms, default=0.0),
            "cpu_percent": self.cpu_percent,
            "client_bound": p99 > LAG_P99_LIMIT_MS or self.cpu_percent > CPU_LIMIT_PERCENT,
        }


def _turn(session: Session, index: int, history: list[tuple[str, str]]) -> Turn:
    user = session.turns[index]
    if session.raw and len(session.turns) == 1 and session.system is None:
        return Turn(None, user.text, user.max_tokens)
    msgs = ([("system", session.system)] if session.system else []) + history
    return Turn((*msgs, ("user", user.text)), None, user.max_tokens)


class _Worker:
    """One event loop's share of the run."""

    def __init__(self, target: Target, progress: Progress, timeout_s: float) -> None:
        self.target = target
        self.progress = progress
        self.timeout_s = timeout_s
        self.records: list[RawRecord] = []
        self.sent_ns: list[int] = []
        self.monitor = Monitor()
        self._next_id = 0

    async def _one(self, http: aiohttp.ClientSession, raw: RawRecord, turn: Turn) -> None:
        req = self.target.request(turn)
        self.records.append(raw)
        self.progress.sent += 1
        raw.sent_ns = time.perf_counter_ns()
        try:
            async with http.post(req.url, data=req.body, headers=req.headers) as resp:
                raw.status = resp.status
                raw.headers_ns = time.perf_counter_ns()
                reads = raw.reads
                async for data in resp.content.iter_any():
                    reads.append((time.perf_counter_ns(), data))
                self.progress.reads += len(reads)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raw.exc = f"{type(exc).__name__}: {exc}"
        raw.end_ns = time.perf_counter_ns()
        self.progress.done += 1
        if raw.exc or (raw.status or 0) >= 400:
            self.progress.errors += 1

    async def session(
        self, http: aiohttp.ClientSession, s: Session, sid: int, intended_ns: int | None
    ) -> None:
        history: list[tuple[str, str]] = []
        for i, user in enumerate(s.turns):
            if i and s.think_time_s:
                await asyncio.sleep(s.think_time_s)
            raw = RawRecord(
                id=sid * 1000 + i if len(s.turns) > 1 else sid,
                session=sid,
                turn=i,
                requested_tokens=user.max_tokens,
                prompt_tokens_client=user.prompt_tokens,
                intended_ns=intended_ns if i == 0 and intended_ns else time.perf_counter_ns(),
            )
            await self._one(http, raw, _turn(s, i, history))
            if i + 1 < len(s.turns):  # the next turn carries the real answer
                answer = parse(raw, self.target, 0, None)
                if not answer.ok:
                    return
                history += [("user", user.text), ("assistant", answer.text)]

    async def _monitor(self, stop: asyncio.Event) -> None:
        proc = psutil.Process()
        proc.cpu_percent(None)
        t0 = time.perf_counter()
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(MONITOR_INTERVAL_S)
            self.monitor.lags_ms.append((time.perf_counter() - before - MONITOR_INTERVAL_S) * 1e3)
        if time.perf_counter() - t0 > 0.2:
            self.monitor.cpu_percent = proc.cpu_percent(None)

    async def run(
        self, sessions: list[tuple[int, Session]], load: LoadModel, start_ns: int
    ) -> None:
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        stop = asyncio.Event()
        monitor = asyncio.create_task(self._monitor(stop))
        async with aiohttp.ClientSession(
            connector=conn, timeout=timeout, read_bufsize=READ_BUFSIZE
        ) as http:
            await _sleep_until(start_ns)
            if isinstance(load, ClosedLoop):
                queue = list(reversed(sessions))

                async def loop() -> None:
                    while queue:
                        sid, s = queue.pop()
                        await self.session(http, s, sid, None)

                await asyncio.gather(*(loop() for _ in range(load.concurrency)))
            else:
                tasks = []
                for (sid, s), d in zip(sessions, load.deadlines, strict=False):
                    intended = start_ns + int(d * 1e9)
                    await _sleep_until(intended)
                    tasks.append(asyncio.create_task(self.session(http, s, sid, intended)))
                await asyncio.gather(*tasks)
        stop.set()
        await monitor


async def _sleep_until(deadline_ns: int) -> None:
    """Sleep to an absolute deadline; the last millisecond is spun off by the loop's timer."""
    delay = (deadline_ns - time.perf_counter_ns()) * 1e-9
    if delay > 0:
        await asyncio.sleep(delay)


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop when installed (without touching the global event-loop policy)."""
    try:
        import uvloop

        return "uvloop", uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return "asyncio", asyncio.new_event_loop


def run_on_fast_loop(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()[1]) as runner:
        return runner.run(coro)


@dataclass
class RunOutput:
    results: list[RequestResult]
    monitor: dict[str, Any]
    delivery: Delivery | None
    loop: str
    workers: int

    @property
    def failed_delivery(self) -> bool:
        return self.delivery is not None and not self.delivery.ok


def _partition(
    sessions: list[Session], load: LoadModel, n: int
) -> list[tuple[list[tuple[int, Session]], LoadModel]]:
    parts: list[tuple[list[tuple[int, Session]], LoadModel]] = []
    for w in range(n):
        mine = [(i, s) for i, s in enumerate(sessions) if i % n == w]
        if isinstance(load, ClosedLoop):
            c = load.concurrency // n + (1 if w < load.concurrency % n else 0)
            parts.append((mine, ClosedLoop(max(c, 1))))
        else:
            d = tuple(x for i, x in enumerate(load.deadlines) if i % n == w)
            parts.append((mine[: len(d)], OpenLoop(d, load.rate / n, load.label)))
    return parts


async def _run_part(
    target: Target,
    part: list[tuple[int, Session]],
    load: LoadModel,
    start_ns: int,
    progress: Progress,
    timeout_s: float,
    tick: Callable[[], None] | None = None,
) -> _Worker:
    w = _Worker(target, progress, timeout_s)
    ticker = None
    if tick is not None:

        async def ticking() -> None:
            while True:
                tick()
                await asyncio.sleep(0.25)

        ticker = asyncio.create_task(ticking())
    try:
        await w.run(part, load, start_ns)
    finally:
        if ticker is not None:
            ticker.cancel()
    return w


def _worker_main(
    conn: Connection,
    target: Target,
    part: list[tuple[int, Session]],
    load: LoadModel,
    timeout_s: float,
) -> None:
    conn.send("ready")
    start_ns = conn.recv()
    progress = Progress()

    def tick() -> None:
        conn.send(("progress", progress))

    w = run_on_fast_loop(_run_part(target, part, load, start_ns, progress, timeout_s, tick))
    conn.send(("done", w.records, w.monitor))
    conn.close()


def run(
    target: Target,
    sessions: list[Session],
    load: LoadModel,
    tokenizer: Tokenizer | None = None,
    workers: int = 1,
    timeout_s: float = 600.0,
    delivery_tolerance: float = 0.05,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutput:
    """Run `sessions` under `load` and parse the results. Open loop sends one session per
    deadline (sessions beyond the deadlines are not sent)."""
    loop_name = loop_factory()[0]
    if isinstance(load, OpenLoop):
        sessions = sessions[: len(load.deadlines)]
    monitors: list[Monitor] = []
    records: list[RawRecord] = []
    if workers <= 1:
        progress = Progress()
        start_ns = time.perf_counter_ns() + 20_000_000
        tick = (lambda: on_progress(progress)) if on_progress else None
        w = run_on_fast_loop(
            _run_part(target, list(enumerate(sessions)), load, start_ns, progress, timeout_s, tick)
        )
        records, monitors = w.records, [w.monitor]
    else:
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        for part, part_load in _partition(sessions, load, workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, target, part, part_load, timeout_s))
            p.start()
            pipes.append(parent)
            procs.append(p)
        for c in pipes:
            c.recv()
        start_ns = time.perf_counter_ns() + 100_000_000
        for c in pipes:
            c.send(start_ns)
        latest: dict[int, Progress] = {}
        pending = set(range(workers))
        while pending:
            for i in list(pending):
                while pipes[i].poll(0.05):
                    msg = pipes[i].recv()
                    if msg[0] == "progress":
                        latest[i] = msg[1]
                    else:
                        records += msg[1]
                        monitors.append(msg[2])
                        pending.discard(i)
                        break
            if on_progress:
                total = Progress()
                for pr in latest.values():
                    total.add(pr)
                on_progress(total)
        for p in procs:
            p.join()
    results = sorted(
        (parse(r, target, start_ns, tokenizer) for r in records), key=lambda r: r.sent_offset_s
    )
    merged = Monitor([x for m in monitors for x in m.lags_ms], max(m.cpu_percent for m in monitors))
    delivery = None
    if isinstance(load, OpenLoop):
        first = [r.sent_offset_s for r in results if r.turn == 0]
        delivery = check_delivery(load, first, delivery_tolerance)
    return RunOutput(results, merged.summary(), delivery, loop_name, max(workers, 1))
