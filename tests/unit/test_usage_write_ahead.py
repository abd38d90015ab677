"""Write-ahead usage entries (issue 9): an admitted request's open entry is never counted,
its final record replaces it, and when its owner dies (no heartbeat for `dead_after_s`) a
live ledger records it as error/replica_lost, exactly once, never touching a live owner's
entries. Each test runs on SQLite and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from serve.gateway.ledger import LOST_REASON, OpenRequest, UsageLedger, UsageRecord
from serve.gateway.ledger_liveness import LivenessTimers
from serve.gateway.redis_ledger import KEY_PREFIX, OWNERS_PREFIX, RedisLedger
from serve.gateway.redis_ratelimit import redis_client
from serve.gateway.sqlite_ledger import SqliteLedger
from tests.redis_server import RedisProcess

ACCOUNT = "acct-w"
DEAD_AFTER_S = 1.0
HEARTBEAT_S = 0.1


def entry(i: int, prompt_tokens: int = 5) -> OpenRequest:
    return OpenRequest(
        request_id=f"req-{i}",
        tenant_id="t",
        account_id=ACCOUNT,
        model="m",
        prompt_tokens=prompt_tokens,
        started_at=time.time(),
    )


def final(e: OpenRequest, completion_tokens: int = 3) -> UsageRecord:
    return UsageRecord(
        request_id=e.request_id,
        tenant_id=e.tenant_id,
        account_id=e.account_id,
        model=e.model,
        prompt_tokens=e.prompt_tokens,
        completion_tokens=completion_tokens,
        status="ok",
        finish_reason="stop",
        started_at=e.started_at,
        ended_at=time.time(),
    )


@dataclass
class Store:
    """One shared store (a SQLite file, or a Redis) and the ledgers of several owners."""

    kind: str
    path: Path
    redis_url: str | None = None
    ledgers: list[UsageLedger] = field(default_factory=list)

    def ledger(self, owner: str) -> SqliteLedger | RedisLedger:
        timers = LivenessTimers(heartbeat_s=HEARTBEAT_S, dead_after_s=DEAD_AFTER_S, sweep_s=0.05)
        made: SqliteLedger | RedisLedger
        if self.redis_url is None:
            made = SqliteLedger(self.path, timers=timers, owner=owner)
        else:
            client = redis_client(self.redis_url, 2.0)  # a loaded machine: no fallback here
            made = RedisLedger(client, timeout_s=2.0, timers=timers, owner=owner)
        self.ledgers.append(made)
        return made

    def records(self) -> list[dict[str, str]]:
        """Every final record in the store, as strings."""
        if self.redis_url is None:
            with closing(sqlite3.connect(self.path)) as db:
                rows = db.execute("SELECT * FROM usage")
                names = [d[0] for d in rows.description]
                return [dict(zip(names, map(str, row), strict=True)) for row in rows]
        with closing(redis.Redis.from_url(self.redis_url, decode_responses=True)) as r:
            stream = f"{KEY_PREFIX}:{{{ACCOUNT}}}:stream"
            return [dict(fields) for _id, fields in r.xrange(stream)]

    def open_entries(self) -> list[str]:
        """Request ids of the open entries in the store, all owners together."""
        if self.redis_url is None:
            with closing(sqlite3.connect(self.path)) as db:
                return [str(rid) for (rid,) in db.execute("SELECT request_id FROM open_usage")]
        with closing(redis.Redis.from_url(self.redis_url, decode_responses=True)) as r:
            return [rid for key in r.scan_iter(f"{OWNERS_PREFIX}:open:*") for rid in r.hkeys(key)]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> AsyncIterator[Store]:
    if request.param == "redis":
        with closing(redis.Redis.from_url(redis_url)) as r:
            r.flushdb()
    made = Store(request.param, tmp_path / "usage.sqlite3",
                 redis_url if request.param == "redis" else None)  # fmt: skip
    yield made
    for ledger in made.ledgers:
        await ledger.close()


async def die(ledger: SqliteLedger | RedisLedger) -> None:
    """What SIGKILL does to an owner: its heartbeat stops, nothing is cleaned up."""
    await ledger.liveness.stop()


async def test_open_entry_is_not_counted_and_its_record_replaces_it(store: Store) -> None:
    a = store.ledger("a")
    e = entry(1, prompt_tokens=7)
    await a.open(e)
    assert store.open_entries() == ["req-1"]
    assert list(await a.totals(ACCOUNT, 0, time.time() + 1)) == []
    assert store.records() == []

    await a.record(final(e, completion_tokens=4))
    await a.record(final(e, completion_tokens=9))  # a second record is ignored
    await a.beat()  # Redis: ended requests' entries go with the next heartbeat
    assert store.open_entries() == []
    (rec,) = store.records()
    assert (rec["request_id"], rec["status"], rec["completion_tokens"]) == ("req-1", "ok", "4")
    (totals,) = await a.totals(ACCOUNT, 0, time.time() + 1)
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (1, 7, 4)


async def test_dead_owner_requests_are_recorded_as_replica_lost(store: Store) -> None:
    a, b = store.ledger("a"), store.ledger("b")
    lost = [entry(1, prompt_tokens=5), entry(2, prompt_tokens=7)]
    done = entry(3)
    for e in [*lost, done]:
        await a.open(e)
    await a.record(final(done))
    await a.beat()
    await die(a)
    assert await b.sweep() == 0  # a's last heartbeat is too recent to call it dead
    assert sorted(store.open_entries()) == ["req-1", "req-2"]

    await asyncio.sleep(DEAD_AFTER_S + 0.1)
    assert await b.sweep() == 2
    assert await b.sweep() == 0  # idempotent
    records = {r["request_id"]: r for r in store.records()}
    assert sorted(records) == ["req-1", "req-2", "req-3"]
    for e in lost:
        r = records[e.request_id]
        assert (r["status"], r["finish_reason"], r["completion_tokens"]) == ("error", LOST_REASON,
                                                                            "0")  # fmt: skip
        assert float(r["ended_at"]) >= float(r["started_at"])
    assert records["req-3"]["status"] == "ok"
    assert store.open_entries() == []
    (totals,) = await b.totals(ACCOUNT, 0, time.time() + 1)
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (3, 17, 3)

    # The owner was only paused after all: its late final record loses the race.
    await a.record(final(lost[0]))
    assert {r["request_id"]: r["status"] for r in store.records()}["req-1"] == "error"
    assert len(store.records()) == 3


async def test_live_owner_entries_are_never_touched(store: Store) -> None:
    a, b = store.ledger("a"), store.ledger("b")
    e = entry(1)
    await a.open(e)  # also starts a's heartbeat
    await b.start()
    deadline = time.monotonic() + 3 * DEAD_AFTER_S
    while time.monotonic() < deadline:
        assert await b.sweep() == 0
        await asyncio.sleep(0.05)
    assert store.open_entries() == ["req-1"] and store.records() == []
    await a.record(final(e))
    (rec,) = store.records()
    assert rec["status"] == "ok"


async def test_two_sweepers_racing_write_one_record_per_request(store: Store) -> None:
    a, b, c = store.ledger("a"), store.ledger("b"), store.ledger("c")
    entries = [entry(i) for i in range(60)]
    for e in entries:
        await a.open(e)
    await die(a)
    await asyncio.sleep(DEAD_AFTER_S + 0.1)
    # Two sweepers at once, and the "dead" owner's late record for one request.
    swept = await asyncio.gather(b.sweep(), c.sweep(), b.sweep(), a.record(final(entries[0])))
    records = store.records()
    ids = [r["request_id"] for r in records]
    assert sorted(ids) == sorted(e.request_id for e in entries)  # one record each
    ok = sum(r["status"] == "ok" for r in records)
    assert ok <= 1 and swept[0] + swept[1] + swept[2] + ok == 60, (swept, ok)
    assert store.open_entries() == []
    (totals,) = await b.totals(ACCOUNT, 0, time.time() + 1)
    assert totals.requests == 60


async def test_background_sweep_records_a_killed_owner_within_the_timeout(store: Store) -> None:
    a, b = store.ledger("a"), store.ledger("b")
    await b.start()
    e = entry(1)
    await a.open(e)
    await asyncio.sleep(3 * DEAD_AFTER_S)
    assert store.records() == []  # a is alive (its heartbeat runs)
    await die(a)
    killed = time.monotonic()
    while not store.records():
        assert time.monotonic() - killed < DEAD_AFTER_S + 1.5, "not swept in time"
        await asyncio.sleep(0.02)
    (rec,) = store.records()
    assert (rec["request_id"], rec["finish_reason"]) == ("req-1", LOST_REASON)
    print(f"\n[{store.kind}] swept {time.monotonic() - killed:.2f} s after the heartbeat stopped"
          f" (dead after {DEAD_AFTER_S} s)")  # fmt: skip


async def test_sqlite_sweep_at_startup_takes_no_lock_when_nothing_is_dead(tmp_path: Path) -> None:
    a = SqliteLedger(tmp_path / "u.sqlite3", owner="a")
    try:
        await a.open(entry(1))
        with closing(sqlite3.connect(tmp_path / "u.sqlite3", timeout=0)) as db:
            db.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            b = SqliteLedger(tmp_path / "u.sqlite3", owner="b")
            try:
                assert await asyncio.wait_for(b.sweep(), 5) == 0
            finally:
                db.execute("ROLLBACK")
                await b.close()
    finally:
        await a.close()


@dataclass
class WithFallback:
    """A real redis-server, and a RedisLedger on it with a local SQLite fallback."""

    server: RedisProcess
    fallback: SqliteLedger
    ledger: RedisLedger
    errors: list[str]


@asynccontextmanager
async def redis_with_fallback(
    tmp_path: Path, owner: str, timers: LivenessTimers | None = None
) -> AsyncIterator[WithFallback]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    fallback = SqliteLedger(tmp_path / "fallback.sqlite3", owner=f"{owner}-local")
    errors: list[str] = []
    ledger = RedisLedger(
        redis_client(server.url, 0.25), timeout_s=0.25, fallback=fallback, owner=owner,
        on_error=errors.append, timers=timers, cooldown_s=0.0,
    )  # fmt: skip
    try:
        yield WithFallback(server, fallback, ledger, errors)
    finally:
        await ledger.close()
        server.stop()


async def test_redis_unreachable_open_goes_to_the_fallback(tmp_path: Path) -> None:
    """Redis down at admission: the open entry goes to the local fallback (the request
    runs on); Redis back at the end: the record goes to Redis and the local entry goes."""

    def local(table: str) -> int:
        with closing(sqlite3.connect(tmp_path / "fallback.sqlite3")) as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    async with redis_with_fallback(tmp_path, "a") as it:
        server, ledger, errors = it.server, it.ledger, it.errors
        server.stop()
        e1, e2 = entry(1), entry(2)
        started = time.monotonic()
        await ledger.open(e1)
        await ledger.open(e2)
        assert time.monotonic() - started < 2
        assert errors == ["ledger", "ledger"]
        assert local("open_usage") == 2
        await ledger.record(final(e1))  # Redis still down: the fallback records it
        assert (local("usage"), local("open_usage")) == (1, 1)

        server.start()
        await ledger.record(final(e2))
        assert local("open_usage") == 0
        await ledger.beat()  # Redis answers: the fallback's record is handed on
        assert local("usage") == 0
        with closing(redis.Redis.from_url(server.url, decode_responses=True)) as r:
            stream = r.xrange(f"{KEY_PREFIX}:{{{ACCOUNT}}}:stream")
            assert sorted(rec[1]["request_id"] for rec in stream) == ["req-1", "req-2"]


async def test_records_of_a_redis_outage_reach_redis_once_it_is_back(tmp_path: Path) -> None:
    """Final records the fallback took while Redis was away are handed on when a heartbeat
    reaches Redis again, so the usage route (which reads Redis) counts them, and a replica's
    local file does not keep them from it. One that had reached Redis after all (a reply
    lost to a timeout) is not counted twice."""
    async with redis_with_fallback(tmp_path, "b") as it:
        server, fallback, ledger = it.server, it.fallback, it.ledger
        landed = final(entry(0), completion_tokens=7)
        await ledger.record(landed)
        await fallback.record(landed)  # also kept locally, as after a lost reply
        server.stop()
        outage = [final(entry(i), completion_tokens=i) for i in range(1, 4)]
        for record in outage:
            await ledger.record(record)
        with pytest.raises(redis.exceptions.ConnectionError):
            await ledger.beat()  # Redis still away: nothing handed on, nothing dropped
        assert len(await fallback.oldest(100)) == 4

        server.start()  # the same Redis back (AOF)
        await ledger.beat()
        assert await fallback.oldest(100) == []
        (totals,) = await ledger.totals(ACCOUNT, 0, time.time() + 60)
        assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (4, 20, 13)
        await ledger.beat()  # nothing left: nothing written twice
        (again,) = await ledger.totals(ACCOUNT, 0, time.time() + 60)
        assert again == totals


async def test_a_stopping_replica_hands_on_the_fallback_or_logs_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At stop the fallback's records are handed on to Redis without waiting for a beat;
    those Redis cannot take are logged one JSON record a line (the fallback may be the
    pod's own file, gone with it)."""
    async with redis_with_fallback(tmp_path, "s") as it:
        server, fallback, ledger = it.server, it.fallback, it.ledger
        server.stop()
        outage = [final(entry(i), completion_tokens=i) for i in range(1, 4)]
        for record in outage:
            await ledger.record(record)
        await ledger.stop()  # Redis still away: the records are logged
        logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert "3 usage records written while Redis was away" in logged[0]
        lines = [json.loads(m.split(": ", 1)[1]) for m in logged[1:]]
        assert [(r["request_id"], r["completion_tokens"]) for r in lines] == [
            (r.request_id, r.completion_tokens) for r in outage
        ]
        assert len(await fallback.oldest(100)) == 3  # still there for a later replica

    caplog.clear()
    async with redis_with_fallback(tmp_path / "back", "t") as it:
        server, fallback, ledger = it.server, it.fallback, it.ledger
        server.stop()
        for record in outage:
            await ledger.record(record)
        server.start()  # back, and no heartbeat before the stop
        await ledger.stop()
        assert await fallback.oldest(100) == []
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        with closing(redis.Redis.from_url(server.url, decode_responses=True)) as r:
            stream = r.xrange(f"{KEY_PREFIX}:{{{ACCOUNT}}}:stream")
            assert sorted(rec[1]["request_id"] for rec in stream) == ["req-1", "req-2", "req-3"]


async def test_open_entry_in_redis_carries_what_the_sweeper_needs(redis_url: str) -> None:
    with closing(redis.Redis.from_url(redis_url, decode_responses=True)) as r:
        r.flushdb()
        ledger = RedisLedger(redis_client(redis_url, 0.25), timeout_s=0.25, owner="x")
        try:
            e = entry(9, prompt_tokens=11)
            await ledger.open(e)
            stored = json.loads(r.hget(f"{OWNERS_PREFIX}:open:x", "req-9") or "{}")
            assert OpenRequest(**stored) == e
            ttl_ms = r.pttl(f"{OWNERS_PREFIX}:alive:x")
            assert 0 < ttl_ms <= 10_000
            assert r.smembers(f"{OWNERS_PREFIX}:set") == {"x"}
        finally:
            await ledger.close()
        assert r.exists(f"{OWNERS_PREFIX}:alive:x") == 0  # a closed owner is dead at once


async def test_a_record_falling_back_during_a_hand_on_is_handed_on_by_the_next_beat(
    tmp_path: Path,
) -> None:
    """A record that falls back while a heartbeat hands a page on (Redis failed that one
    write, e.g. a timeout) is handed on by a later heartbeat, not kept locally until the
    next outage or restart: the pending mark the hand-on clears must not erase its own."""
    async with redis_with_fallback(tmp_path, "c") as it:
        fallback, ledger = it.fallback, it.ledger
        early, late = final(entry(1), completion_tokens=2), final(entry(2), completion_tokens=5)
        write, oldest = ledger._write, fallback.oldest

        async def failing_late(record: UsageRecord) -> bool:
            if record.request_id == late.request_id:
                raise redis.exceptions.TimeoutError("one write lost")
            return await write(record)

        async def oldest_then_late_falls_back(limit: int) -> list[UsageRecord]:
            page = await oldest(limit)
            await ledger.record(late)  # concurrently, as a request ending beside the beat
            return page

        await fallback.record(early)  # from an earlier outage
        ledger._write = failing_late  # type: ignore[method-assign]
        fallback.oldest = oldest_then_late_falls_back  # type: ignore[method-assign]
        await ledger.beat()  # hands on `early`; `late` falls back meanwhile
        ledger._write, fallback.oldest = write, oldest  # type: ignore[method-assign]
        assert [r.request_id for r in await fallback.oldest(10)] == [late.request_id]

        await ledger.beat()
        assert await fallback.oldest(10) == []
        (totals,) = await ledger.totals(ACCOUNT, 0, time.time() + 60)
        assert (totals.requests, totals.completion_tokens) == (2, 7)


async def test_a_failing_or_slow_hand_on_is_not_a_failed_or_late_heartbeat(tmp_path: Path) -> None:
    """The heartbeat has landed before the hand-on: a hand-on write that fails must not fail
    the beat (Liveness would log a failed heartbeat and hold this owner's sweeps back), and a
    slow one must stop within its share of dead_after_s (a late next heartbeat lets the other
    owners take this one for dead and record its running requests as lost). What is left
    stays local and a later beat hands it on."""
    timers = LivenessTimers(heartbeat_s=0.1, dead_after_s=0.4, sweep_s=0.1)
    async with redis_with_fallback(tmp_path, "d", timers) as it:
        fallback, ledger, errors = it.fallback, it.ledger, it.errors
        outage = [final(entry(i), completion_tokens=1) for i in range(10)]
        write = ledger._write

        async def broken(record: UsageRecord) -> bool:
            raise redis.exceptions.ResponseError("the record script failed")

        async def slow(record: UsageRecord) -> bool:
            await asyncio.sleep(0.05)
            return await write(record)

        for record in outage:
            await fallback.record(record)
        ledger._write = broken  # type: ignore[method-assign]
        await ledger.beat()  # the heartbeat landed; the hand-on failed
        assert errors == ["ledger"]
        assert len(await fallback.oldest(100)) == 10

        ledger._write = slow  # type: ignore[method-assign]
        started = time.monotonic()
        await ledger.beat()
        assert time.monotonic() - started < 0.3  # 0.1 s of hand-on, not 0.5
        assert 0 < len(await fallback.oldest(100)) < 10
        ledger._write = write  # type: ignore[method-assign]
        await ledger.beat()
        assert await fallback.oldest(100) == []
        (totals,) = await ledger.totals(ACCOUNT, 0, time.time() + 60)
        assert (totals.requests, totals.completion_tokens) == (10, 10)
