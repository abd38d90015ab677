"""The usage ledger: one durable record per finished request.

`SqliteLedger` (WAL, synchronous=FULL) is the embedded default for a single
replica; `serve.gateway.redis_ledger.RedisLedger` puts every replica's records
in one Redis. A record is keyed by its request id and written at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    account_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    status: str  # ok | aborted | error
    finish_reason: str
    started_at: float  # epoch seconds
    ended_at: float
    ttft_s: float | None = None


@dataclass(frozen=True)
class ModelTotals:
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class UsageLedger(Protocol):
    async def record(self, record: UsageRecord) -> None:
        """Store the record durably (a second record with the same request id is ignored)."""
        ...

    async def totals(self, account_id: str, since: float, until: float) -> Sequence[ModelTotals]:
        """Per-model totals of one account for requests that ended in [since, until)."""
        ...

    async def close(self) -> None: ...


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
"""


_INSERT = "INSERT OR IGNORE INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?)"


class _Waiter:
    """One record waiting for its commit, and how to wake its caller's event loop."""

    __slots__ = ("done", "loop", "record")

    def __init__(self, record: UsageRecord, loop: asyncio.AbstractEventLoop) -> None:
        self.record = record
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()

    def settle(self, error: BaseException | None) -> None:
        def wake() -> None:
            if self.done.done():  # the caller went away; the record is still written
                return
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

        with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits
            self.loop.call_soon_threadsafe(wake)


class SqliteLedger:
    """SQLite in WAL mode; every record is committed (and fsynced) before `record` returns.

    One worker thread owns the connection, so the event loop never blocks on disk. Group
    commit: the worker takes every record queued so far and commits them in one transaction
    (one fsync), then wakes each caller; records that arrive during that commit go in the
    next one. Several processes on one machine may share the file (SQLite locks it).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
        self._conn: sqlite3.Connection | None = None
        self._queued: list[_Waiter] = []
        self._queue_lock = threading.Lock()
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def _write(self, records: Sequence[UsageRecord]) -> None:
        """Insert `records` in one transaction (one fsync under synchronous=FULL)."""
        conn = self._conn
        assert conn is not None
        rows = [(r.request_id, r.tenant_id, r.account_id, r.model, r.prompt_tokens,
                 r.completion_tokens, r.status, r.finish_reason, r.started_at, r.ended_at,
                 r.ttft_s) for r in records]  # fmt: skip
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                conn.execute("ROLLBACK")
            raise

    def _flush(self) -> None:
        """Worker thread: commit everything queued, then wake the callers."""
        with self._queue_lock:
            batch, self._queued = self._queued, []
        if not batch:
            return
        error: BaseException | None = None
        try:
            self._write([w.record for w in batch])
        except Exception as exc:
            error = exc
        for w in batch:
            w.settle(error)

    def _totals(self, account_id: str, since: float, until: float) -> list[ModelTotals]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
            " WHERE account_id = ? AND ended_at >= ? AND ended_at < ?"
            " GROUP BY model ORDER BY model",
            (account_id, since, until),
        ).fetchall()
        return [ModelTotals(str(m), int(n), int(p), int(c)) for m, n, p, c in rows]

    async def record(self, record: UsageRecord) -> None:
        waiter = _Waiter(record, asyncio.get_running_loop())
        with self._queue_lock:
            self._queued.append(waiter)
            first = len(self._queued) == 1
        if first:  # otherwise a flush already queued will take this record too
            try:
                self._pool.submit(self._flush)
            except RuntimeError:  # closed
                with self._queue_lock:
                    self._queued.remove(waiter)
                raise
        await waiter.done

    async def totals(self, account_id: str, since: float, until: float) -> Sequence[ModelTotals]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._totals, account_id, since, until)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=False)
