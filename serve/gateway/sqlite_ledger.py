"""`SqliteLedger`: the usage ledger in one SQLite file (WAL), the embedded default."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from serve.gateway.ledger import (
    LOST_REASON,
    LOST_STATUS,
    ModelTotals,
    OpenRequest,
    UsageRecord,
)
from serve.gateway.ledger_liveness import Liveness, LivenessTimers, new_owner_id

_T = TypeVar("_T")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    ttft_s REAL
);
CREATE INDEX IF NOT EXISTS usage_account_time ON usage (account_id, ended_at);
CREATE TABLE IF NOT EXISTS open_usage (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    started_at REAL NOT NULL,
    owner TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS open_usage_owner ON open_usage (owner);
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    last_seen REAL NOT NULL
);
"""

_BEAT = (
    "INSERT INTO owners VALUES (?, ?)"
    " ON CONFLICT (owner) DO UPDATE SET last_seen = excluded.last_seen"
)
# Open entries of owners other than this one (?1) with no heartbeat since ?2.
_ORPHANS = (
    "FROM open_usage WHERE owner != ?1"
    " AND owner NOT IN (SELECT owner FROM owners WHERE last_seen >= ?2)"
)


class SqliteLedger:
    """SQLite in WAL mode; every final record is committed (and fsynced) before it returns.

    One worker thread owns the connection, so the event loop never blocks on disk.
    Several processes on one machine may share the file (SQLite locks it); each is an
    owner with a row in `owners` (its heartbeat). Open entries and heartbeats are
    committed without an fsync (synchronous=NORMAL: they survive the process being
    killed, which is what they are for, and cost no disk flush on the admission path).
    """

    def __init__(
        self,
        path: Path,
        *,
        timers: LivenessTimers | None = None,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self.owner = owner or new_owner_id()
        self._timers = timers or LivenessTimers()
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._pool.submit(self._open).result()
        self.liveness = Liveness(f"usage ledger {path.name}", self._timers, self.beat, self.sweep)

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def _tx(self, body: Callable[[sqlite3.Connection], _T], *, fsync: bool = True) -> _T:
        """Run `body` in one write transaction (taken at once: no lock upgrade deadlock)."""
        conn = self._conn
        assert conn is not None
        if not fsync:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if not fsync:
                conn.execute("PRAGMA synchronous=FULL")
        return result

    def _write(self, r: UsageRecord) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (r.request_id, r.tenant_id, r.account_id, r.model, r.prompt_tokens,
                 r.completion_tokens, r.status, r.finish_reason, r.started_at, r.ended_at,
                 r.ttft_s),
            )  # fmt: skip
            conn.execute("DELETE FROM open_usage WHERE request_id = ?", (r.request_id,))

        self._tx(body)

    def _write_open(self, e: OpenRequest) -> None:
        def body(conn: sqlite3.Connection) -> None:
            # The owner's row in the same transaction: a sweeper never sees the entry
            # without a fresh heartbeat, even before the liveness task first ran.
            conn.execute(_BEAT, (self.owner, self._clock()))
            conn.execute(
                "INSERT OR IGNORE INTO open_usage VALUES (?,?,?,?,?,?,?)",
                (e.request_id, e.tenant_id, e.account_id, e.model, e.prompt_tokens,
                 e.started_at, self.owner),
            )  # fmt: skip

        self._tx(body, fsync=False)

    def _forget(self, request_id: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM open_usage WHERE request_id = ? AND owner = ?",
                (request_id, self.owner),
            )

        self._tx(body, fsync=False)

    def _oldest(self, limit: int) -> list[UsageRecord]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT * FROM usage ORDER BY ended_at LIMIT ?", (limit,)
        ).fetchall()
        return [UsageRecord(*row) for row in rows]

    def _drop(self, request_ids: Sequence[str]) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM usage WHERE request_id = ?", [(r,) for r in request_ids])

        self._tx(body)

    def _beat(self) -> None:
        self._tx(lambda conn: conn.execute(_BEAT, (self.owner, self._clock())), fsync=False)

    def _sweep(self) -> int:
        conn = self._conn
        assert conn is not None
        cutoff = self._clock() - self._timers.dead_after_s
        # A read first: most sweeps find nothing and take no write lock.
        orphan = conn.execute(f"SELECT 1 {_ORPHANS} LIMIT 1", (self.owner, cutoff)).fetchone()
        stale = conn.execute(
            "SELECT 1 FROM owners WHERE last_seen < ? AND owner != ? LIMIT 1", (cutoff, self.owner)
        ).fetchone()
        if orphan is None and stale is None:
            return 0

        def body(conn: sqlite3.Connection) -> int:
            # Decided again under the write lock: two sweepers finalize an entry once.
            now = self._clock()
            cutoff = now - self._timers.dead_after_s
            lost = conn.execute(
                "INSERT OR IGNORE INTO usage SELECT request_id, tenant_id, account_id, model,"
                f" prompt_tokens, 0, ?3, ?4, started_at, max(?5, started_at), NULL {_ORPHANS}",
                (self.owner, cutoff, LOST_STATUS, LOST_REASON, now),
            ).rowcount
            conn.execute(f"DELETE {_ORPHANS}", (self.owner, cutoff))
            conn.execute(
                "DELETE FROM owners WHERE last_seen < ? AND owner != ?", (cutoff, self.owner)
            )
            return lost

        return self._tx(body)

    def _totals(self, account_id: str, since: float, until: float) -> list[ModelTotals]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
            " WHERE account_id = ? AND ended_at >= ? AND ended_at < ?"
            " GROUP BY model ORDER BY model",
            (account_id, since, until),
        ).fetchall()
        return [ModelTotals(str(m), int(n), int(p), int(c)) for m, n, p, c in rows]

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self, entry: OpenRequest) -> None:
        self.liveness.ensure_running()
        await self._run(self._write_open, entry)

    async def record(self, record: UsageRecord) -> None:
        await self._run(self._write, record)

    async def forget(self, request_id: str) -> None:
        """Drop this owner's open entry of a request recorded elsewhere (`RedisLedger`)."""
        await self._run(self._forget, request_id)

    async def oldest(self, limit: int) -> list[UsageRecord]:
        """Up to `limit` final records, oldest first (to hand on to another store)."""
        return await self._run(self._oldest, limit)

    async def drop(self, request_ids: Sequence[str]) -> None:
        """Delete these final records (handed on to another store that keeps them)."""
        await self._run(self._drop, request_ids)

    async def beat(self) -> None:
        await self._run(self._beat)

    async def sweep(self) -> int:
        """Finalize the open entries of dead owners; returns how many records it wrote."""
        return await self._run(self._sweep)

    async def totals(self, account_id: str, since: float, until: float) -> Sequence[ModelTotals]:
        return await self._run(self._totals, account_id, since, until)

    async def start(self) -> None:
        self.liveness.ensure_running()

    async def stop(self) -> None:
        await self.liveness.stop()

        def gone() -> None:  # whatever is still open here can be finalized at once
            assert self._conn is not None
            self._conn.execute("DELETE FROM owners WHERE owner = ?", (self.owner,))

        await self._run(gone)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.stop()
        finally:

            def shut() -> None:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

            await self._run(shut)
            self._pool.shutdown(wait=False)
