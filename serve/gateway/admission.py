"""Admission of one request: its tenant's limits, a fair share of the replica, and its
usage record.

`Gate.admit` counts the request against the tenant's plan (`RateLimiter`), then
waits for engine slots in the tenant's queue (`FairQueue`). The returned
`Ticket` travels with the request's completions; when the last one ends, on
any exit path, the ticket frees the slots at once, then settles the real token
usage and writes the usage record, all before the response's last byte is sent.
A completion that never started (the request ended first) ends explicitly
(`Completion.abandon`); the garbage collector (`Ticket.__del__`) is only a
last resort that logs a warning when it has anything to free. Before the
ticket is handed out, the ledger holds the request's open entry (write-ahead), so
a replica killed mid-request still leaves a record behind (`serve.gateway.ledger`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from serve.errors import ModelNotInPlan, TenantRateLimited
from serve.gateway.fair_queue import FairQueue, Lease
from serve.gateway.ledger import OpenRequest, UsageLedger, UsageRecord
from serve.gateway.ratelimit import RateLimiter, Reservation
from serve.gateway.tenants import Tenant

log = logging.getLogger(__name__)

RATE_HEADERS_KEY = "batchserve_rate_headers"
_STATUS_RANK = {"ok": 0, "aborted": 1, "error": 2}


@dataclass(frozen=True)
class Caller:
    """Who a request is for: the tenant, the account it is billed to, the model."""

    tenant: Tenant
    account_id: str
    model: str

    @classmethod
    def of(cls, tenant: Tenant, account_id: str | None, model: str) -> Caller:
        # The bare /v1 routes carry no account: bill the tenant's first account.
        account = account_id or min(tenant.accounts, default=tenant.tenant_id)
        return cls(tenant, account, model)


def rate_headers(scope: MutableMapping[str, Any]) -> dict[str, str]:
    """The response headers admission reports into (sent by `ResponseHeadersMiddleware`)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    headers: dict[str, str] = state.setdefault(RATE_HEADERS_KEY, {})
    return headers


@dataclass
class Ticket:
    """One admitted request; `complete_one` is called once per completion (choice)."""

    gate: Gate
    caller: Caller
    request_id: str
    reservation: Reservation
    lease: Lease
    pending: int
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    # Prompt tokens by prompt index (a batch of prompts): each prompt counts once.
    prompts: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0
    first_token_at: float | None = None
    status: str = "ok"
    finish_reason: str = ""
    done: bool = False

    def complete_one(
        self,
        *,
        prompt_index: int = 0,
        prompt_tokens: int,
        completion_tokens: int,
        status: str,
        finish_reason: str | None,
        first_token_at: float | None,
    ) -> bool:
        """One completion ended. The last one frees the slots now (no await: a cancelled
        caller cannot leave them held) and returns True: the caller then settles and
        records (`Gate.close`)."""
        self.prompts[prompt_index] = prompt_tokens  # once for all of its choices
        self.completion_tokens += completion_tokens
        if _STATUS_RANK.get(status, 2) > _STATUS_RANK.get(self.status, 2):
            self.status = status
        self.finish_reason = self.finish_reason or (finish_reason or "")
        if first_token_at is not None and (
            self.first_token_at is None or first_token_at < self.first_token_at
        ):
            self.first_token_at = first_token_at
        self.pending -= 1
        if self.pending > 0 or self.done:
            return False
        self.done = True
        self.lease.release()
        return True

    def abandon(self) -> bool:
        """The request ended without (the rest of) its completions: free the slots now,
        settle and record as aborted in the background. False when it had ended already."""
        if self.done:
            return False
        self.done, self.status = True, "aborted"
        self.lease.release()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return True
        self.gate.background(loop.create_task(self.gate.close(self)))
        return True

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompts.values())

    def record(self) -> UsageRecord:
        ended = time.time()
        ttft = None
        if self.first_token_at is not None:  # monotonic, like started_mono
            ttft = max(0.0, self.first_token_at - self.started_mono)
        return UsageRecord(
            request_id=self.request_id,
            tenant_id=self.caller.tenant.tenant_id,
            account_id=self.caller.account_id,
            model=self.caller.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            status=self.status,
            finish_reason=self.finish_reason or ("abort" if self.status != "ok" else "stop"),
            started_at=self.started_at,
            ended_at=ended,
            ttft_s=ttft,
        )

    def __del__(self) -> None:
        # Last resort only: every path that ends a request ends its completions, started or
        # not (`Completion.abandon`). Reaching this with slots held is a missed path, whose
        # slots would stay held until a garbage collection.
        if self.abandon():
            log.warning(
                "request %s: its admission was freed by the garbage collector, not when the "
                "request ended (a completion neither ran nor was abandoned)",
                self.request_id,
            )


class Gate:
    """Tenant limits + fair queue + ledger, composed once per replica."""

    def __init__(self, limiter: RateLimiter, queue: FairQueue, ledger: UsageLedger) -> None:
        self.limiter = limiter
        self.queue = queue
        self.ledger = ledger
        self._tasks: set[asyncio.Task[None]] = set()

    async def admit(
        self,
        caller: Caller,
        request_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int,
        choices: int,
        headers_out: dict[str, str],
        wait: bool = True,
    ) -> Ticket:
        plan = caller.tenant.plan
        if not plan.allows_model(caller.model):
            raise ModelNotInPlan(caller.model)
        reserve = prompt_tokens + max_tokens * choices
        try:
            reservation = await self.limiter.admit(
                caller.tenant, request_id, reserve, streams=choices
            )
        except TenantRateLimited as refused:
            if refused.state is not None:
                headers_out.update(refused.state.headers())
            raise
        headers_out.update(reservation.state.headers())
        try:
            lease = await self.queue.acquire(
                caller.tenant.tenant_id, weight=plan.weight, slots=choices, wait=wait
            )
        except BaseException:
            await self.limiter.settle(reservation, 0)
            raise
        ticket = Ticket(self, caller, request_id, reservation, lease, pending=choices)
        try:
            await self._write_ahead(ticket, prompt_tokens)
        except BaseException:  # cancelled meanwhile: settle (and record) as never iterated
            ticket.abandon()
            raise
        return ticket

    async def _write_ahead(self, ticket: Ticket, prompt_tokens: int) -> None:
        """The open entry: one fast write, never a reason to fail the request."""
        caller = ticket.caller
        entry = OpenRequest(
            request_id=ticket.request_id,
            tenant_id=caller.tenant.tenant_id,
            account_id=caller.account_id,
            model=caller.model,
            prompt_tokens=prompt_tokens,
            started_at=ticket.started_at,
        )
        try:
            await self.ledger.open(entry)
        except Exception:
            log.exception("open usage entry failed for request %s", ticket.request_id)

    def refuse_early(self, tenant_id: str) -> None:
        """Refuse now what `admit` would refuse for one more single-slot request of this
        tenant (its queue, or the queue across tenants, is full and it cannot start at
        once). Called before the body is read, parsed and tokenized, so a burst's excess
        costs the replica little more than the authentication."""
        refused = self.queue.refusal(tenant_id)
        if refused is not None:
            raise refused

    async def close(self, ticket: Ticket) -> None:
        ticket.lease.release()
        used = ticket.prompt_tokens + ticket.completion_tokens
        try:
            await self.limiter.settle(ticket.reservation, used)
        except Exception:
            log.exception("settling the rate limit failed for request %s", ticket.request_id)
        try:
            await self.ledger.record(ticket.record())
        except Exception:
            log.exception("usage record failed for request %s", ticket.request_id)

    def background(self, task: asyncio.Task[None]) -> None:
        """Keep `task` alive until it is done, and log its failure: a caller cancelled
        while awaiting it (shielded) no longer reads its outcome."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s failed", task.get_name(), exc_info=exc)
