"""The SQLite ledger's group commit: records queued while a commit is on disk share the next
transaction, every caller returns only after its own record is committed, and a failed
commit fails each caller whose record it held."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from serve.gateway.ledger import SqliteLedger, UsageRecord


def _record(i: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{i}", tenant_id="t", account_id="acct", model="m",
        prompt_tokens=3, completion_tokens=5, status="ok", finish_reason="stop",
        started_at=100.0 + i, ended_at=101.0 + i,
    )  # fmt: skip


class GatedLedger(SqliteLedger):
    """Holds commits until released, so records queue behind one; counts commits."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.release = threading.Event()
        self.failing = False

    def _write(self, records: Sequence[UsageRecord]) -> None:
        self.release.wait(10)
        self.batches.append(len(records))
        if self.failing:
            raise sqlite3.OperationalError("disk I/O error")
        super()._write(records)


def _rows(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT request_id FROM usage")}


async def test_records_queued_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = GatedLedger(path)
    first = asyncio.create_task(ledger.record(_record(0)))
    await asyncio.sleep(0.05)  # the worker now holds record 0's commit
    rest = [asyncio.create_task(ledger.record(_record(i))) for i in range(1, 40)]
    await asyncio.sleep(0.05)
    assert not first.done() and not any(t.done() for t in rest)
    assert _rows(path) == set()  # nothing returned, nothing committed yet
    ledger.release.set()
    await asyncio.gather(first, *rest)
    assert ledger.batches == [1, 39]
    assert _rows(path) == {f"req-{i}" for i in range(40)}  # each durable once returned
    totals = await ledger.totals("acct", 0, 1e9)
    assert [(t.requests, t.prompt_tokens, t.completion_tokens) for t in totals] == [(40, 120, 200)]
    await ledger.close()


async def test_a_failed_commit_fails_every_caller_in_it_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = GatedLedger(path)
    ledger.failing = True
    batch = [asyncio.create_task(ledger.record(_record(i))) for i in range(5)]
    await asyncio.sleep(0.05)
    ledger.release.set()
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    assert _rows(path) == set()
    ledger.failing = False
    await ledger.record(_record(7))
    await ledger.record(_record(7))  # a duplicate request id is ignored
    assert _rows(path) == {"req-7"}
    await ledger.close()


async def test_a_cancelled_caller_still_gets_its_record_written(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    ledger = GatedLedger(path)
    task = asyncio.create_task(ledger.record(_record(1)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ledger.release.set()
    await ledger.record(_record(2))
    assert _rows(path) == {"req-1", "req-2"}
    await ledger.close()
