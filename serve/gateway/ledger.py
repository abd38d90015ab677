"""The usage ledger: one durable record per finished request.

`SqliteLedger` (WAL, synchronous=FULL) is the embedded default for a single
replica; `serve.gateway.redis_ledger.RedisLedger` puts every replica's records
in one Redis. A record is keyed by its request id and written at most once.
"""

from __future__ import annotations

import asyncio
import sqlite3
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


class SqliteLedger:
    """SQLite in WAL mode; every write is committed (and fsynced) before it returns.

    One worker thread owns the connection, so the event loop never blocks on disk.
    Several processes on one machine may share the file (SQLite locks it).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-ledger")
        self._conn: sqlite3.Connection | None = None
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def _write(self, r: UsageRecord) -> None:
        assert self._conn is not None
        self._conn.execute(
            "INSERT OR IGNORE INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (r.request_id, r.tenant_id, r.account_id, r.model, r.prompt_tokens,
             r.completion_tokens, r.status, r.finish_reason, r.started_at, r.ended_at,
             r.ttft_s),
        )  # fmt: skip

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
        await asyncio.get_running_loop().run_in_executor(self._pool, self._write, record)

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
