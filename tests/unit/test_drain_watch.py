"""`serve.replica.drain`: a draining replica sees its drain on its own /-/healthz and calls
its deadline shortly before Serve's budget runs out (the cluster test drives the real one)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from serve.replica.drain import (
    Address,
    DrainWatch,
    Health,
    LearnAddress,
    listening_here,
    probe_healthz,
)

pytestmark = pytest.mark.timeout(20)


@contextlib.asynccontextmanager
async def healthz_server(status: int, body: bytes) -> AsyncIterator[Address]:
    """An HTTP server answering every request like Serve's replica health route."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        reason = b"OK" if status == 200 else b"Service Unavailable"
        head = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n\r\n" % (status, reason, len(body))
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.01)  # the body in a later segment
        writer.write(body)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[:2]


@pytest.mark.parametrize(
    ("status", "body", "health"),
    [
        (200, b"success", Health.SERVING),
        (503, b"DRAINING", Health.DRAINING),
        (503, b"UNHEALTHY", Health.UNHEALTHY),
    ],
)
async def test_probe_reads_serves_health_route(status: int, body: bytes, health: Health) -> None:
    async with healthz_server(status, body) as address:
        assert await probe_healthz(address, 2.0) is health


async def test_a_closed_listener_is_closed_and_silence_is_unknown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[:2]
    assert await probe_healthz(free, 2.0) is Health.CLOSED

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    async with server:
        started = time.monotonic()
        assert await probe_healthz(server.sockets[0].getsockname()[:2], 0.2) is Health.UNKNOWN
        assert time.monotonic() - started < 1.0


class Script:
    """A probe answering from a list (the last answer repeats), noting when it was asked."""

    def __init__(self, answers: Iterable[Health]) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[float, Address, Health]] = []

    async def __call__(self, address: Address, timeout_s: float) -> Health:
        health = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.asked.append((time.monotonic(), address, health))
        return health


ADDRESS = ("127.0.0.1", 30000)


async def watch_until_deadline(
    answers: Iterable[Health], *, budget_s: float, poll_s: float = 0.02, margin_s: float = 0.1
) -> tuple[Script, DrainWatch, list[float]]:
    probe, called = Script(answers), list[float]()
    watch = DrainWatch(
        lambda: called.append(time.monotonic()),
        budget_s=budget_s,
        poll_s=poll_s,
        margin_s=margin_s,
        probe=probe,
    )
    watch.watch(ADDRESS)
    watch.watch(("10.0.0.1", 1))  # only the first address counts
    for _ in range(200):
        if called:
            break
        await asyncio.sleep(0.02)
    watch.stop()
    return probe, watch, called


async def test_the_deadline_counts_from_the_last_probe_that_found_it_serving() -> None:
    answers = [Health.SERVING, Health.UNHEALTHY, Health.UNKNOWN, Health.DRAINING]
    probe, watch, called = await watch_until_deadline(answers, budget_s=0.5, margin_s=0.1)
    assert {address for _, address, _ in probe.asked} == {ADDRESS}
    assert [h for _, _, h in probe.asked] == answers  # no probe after the drain is seen
    # The drain began after the unhealthy answer (an answer, unlike the silent probe).
    last_answer = probe.asked[1][0]
    assert len(called) == 1 and watch.ended_at is not None
    assert 0 <= called[0] - watch.ended_at < 0.01
    assert watch.draining_seen_at is not None and called[0] > watch.draining_seen_at
    assert last_answer + 0.4 <= called[0] < last_answer + 0.4 + 0.15


async def test_a_closed_port_counts_as_draining_and_a_spent_budget_ends_at_once() -> None:
    _, watch, called = await watch_until_deadline(
        [Health.SERVING, Health.CLOSED], budget_s=0.05, margin_s=1.0
    )
    assert len(called) == 1 and watch.draining_seen_at is not None
    assert called[0] - watch.draining_seen_at < 0.05


async def test_no_deadline_while_the_replica_serves() -> None:
    probe, watch, called = await watch_until_deadline([Health.SERVING], budget_s=0.01)
    assert called == [] and len(probe.asked) > 10 and watch.draining_seen_at is None


async def test_the_middleware_starts_the_watch_on_the_first_requests_address() -> None:
    probe = Script([Health.SERVING])
    watch = DrainWatch(lambda: None, budget_s=1, poll_s=0.01, probe=probe)
    seen: list[str] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(str(scope["type"]))

    asked: list[int] = []

    def is_own(port: int) -> bool:
        asked.append(port)
        return port != 8000  # 8000: Serve's proxy, which forwarded the request

    middleware = LearnAddress(app, watch, is_own)  # type: ignore[arg-type]

    async def nothing() -> dict[str, object]:
        return {}

    async def drop(message: object) -> None:
        return None

    await middleware({"type": "lifespan"}, nothing, drop)
    await middleware({"type": "http", "server": None}, nothing, drop)
    await middleware({"type": "http", "server": ("10.1.2.4", 8000)}, nothing, drop)
    await middleware({"type": "http", "server": ("10.1.2.4", 8000)}, nothing, drop)
    assert not watch.started
    await middleware({"type": "http", "server": ("10.1.2.3", 30001)}, nothing, drop)
    await middleware({"type": "http", "server": ("127.0.0.1", 9)}, nothing, drop)
    await asyncio.sleep(0.05)
    watch.stop()
    assert seen == ["lifespan", "http", "http", "http", "http", "http"]
    assert {address for _, address, _ in probe.asked} == {("10.1.2.3", 30001)}
    assert asked == [8000, 30001]  # each port checked once, none after the watch started


async def test_only_this_processs_own_listening_port_counts() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    async with server:
        assert listening_here(server.sockets[0].getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert not listening_here(s.getsockname()[1])  # bound, not listening
