"""The usage ledger: one durable record per admitted request, even when its replica dies.

`serve.gateway.sqlite_ledger.SqliteLedger` (WAL, synchronous=FULL) is the embedded
default for a single replica; `serve.gateway.redis_ledger.RedisLedger` puts every
replica's records in one Redis. A record is keyed by its request id and written at most once.

Write-ahead: at admission a request gets an *open entry* (`OpenRequest`) tagged
with the ledger's owner id (one per ledger instance: host, pid and a random
suffix); its final `UsageRecord` replaces it when the request ends. Open entries
are never counted. Every owner refreshes a heartbeat (`serve.gateway.ledger_liveness`); an owner
whose heartbeat is older than `LivenessTimers.dead_after_s` is dead (SIGKILLed, its
machine gone) and any live ledger sharing the store finalizes its open entries
as `status="error"`, `finish_reason="replica_lost"`, `completion_tokens=0`
(unknown), `ended_at` = when the sweep noticed. A live owner's entries are never
touched. An owner that was only paused longer than `dead_after_s` (SIGSTOP) loses
the race: its late final records are ignored, the `replica_lost` one stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

# The final record of a request whose ledger owner died before it ended.
LOST_STATUS = "error"
LOST_REASON = "replica_lost"


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
class OpenRequest:
    """The write-ahead entry of an admitted request that has not ended yet."""

    request_id: str
    tenant_id: str
    account_id: str
    model: str
    prompt_tokens: int
    started_at: float  # epoch seconds

    def lost(self, noticed_at: float) -> UsageRecord:
        """The final record when the owner died first: what it used is unknown."""
        return UsageRecord(
            request_id=self.request_id,
            tenant_id=self.tenant_id,
            account_id=self.account_id,
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=0,
            status=LOST_STATUS,
            finish_reason=LOST_REASON,
            started_at=self.started_at,
            ended_at=max(noticed_at, self.started_at),
        )


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
    async def open(self, entry: OpenRequest) -> None:
        """Note an admitted request before it runs (never counted; replaced by its record)."""
        ...

    async def record(self, record: UsageRecord) -> None:
        """Store the record durably, replacing its open entry (a second record with the
        same request id is ignored)."""
        ...

    async def totals(self, account_id: str, since: float, until: float) -> Sequence[ModelTotals]:
        """Per-model totals of one account for requests that ended in [since, until)."""
        ...

    async def start(self) -> None:
        """Start the heartbeat and the sweep of dead owners (idempotent; `open` also does)."""
        ...

    async def stop(self) -> None:
        """End the heartbeat and sweeps; this owner counts as gone at once (the ledger stays
        usable: a later `open` or `start` brings it back)."""
        ...

    async def close(self) -> None:
        """`stop`, then release the store."""
        ...
