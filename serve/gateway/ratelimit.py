"""Per-tenant limits: requests/min, tokens/min (prompt + completion), concurrent streams.

Windows are fixed minutes of wall-clock time (`floor(epoch / 60)`), so every
gateway sharing a Redis agrees on them and `Retry-After` is exact: the seconds
left in the window. Tokens are reserved at admission (prompt + max_tokens) and
settled to the real usage when the request ends. A request whose reservation
alone exceeds tokens/min is admitted only into an empty window, so it can
never wait forever.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from serve.errors import RejectionReason, TenantRateLimited
from serve.gateway.tenants import Plan, Tenant

WINDOW_S = 60
# A stream lease lives this long at most (a crashed gateway's streams expire).
STREAM_LEASE_S = 900


@dataclass(frozen=True)
class RateState:
    """What a client sees in the `X-RateLimit-*` headers."""

    requests_limit: int | None
    requests_remaining: int | None
    tokens_limit: int | None
    tokens_remaining: int | None
    reset_s: float

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        reset = str(max(0, math.ceil(self.reset_s)))
        if self.requests_limit is not None:
            out["X-RateLimit-Limit"] = str(self.requests_limit)
            out["X-RateLimit-Remaining"] = str(max(0, self.requests_remaining or 0))
            out["X-RateLimit-Reset"] = reset
        if self.tokens_limit is not None:
            out["X-RateLimit-Limit-Tokens"] = str(self.tokens_limit)
            out["X-RateLimit-Remaining-Tokens"] = str(max(0, self.tokens_remaining or 0))
            out["X-RateLimit-Reset-Tokens"] = reset
        return out


@dataclass(frozen=True)
class Reservation:
    """What admission took from a tenant; hand it back to `settle`."""

    tenant_id: str
    request_id: str
    window: int
    reserved_tokens: int
    state: RateState
    streams: int = 1
    counted: bool = True  # False when admitted without counting (limiter down, fail open)


class RateLimiter(Protocol):
    async def admit(
        self, tenant: Tenant, request_id: str, reserve_tokens: int, *, streams: int = 1
    ) -> Reservation:
        """Count the request or raise `TenantRateLimited` (429 with Retry-After)."""
        ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """The request ended: correct the token count, free its stream slot."""
        ...

    async def peek(self, tenant: Tenant) -> RateState | None:
        """The tenant's counters of the current window, read only (nothing is counted);
        None when they cannot be read (store unreachable)."""
        ...


def window_of(now: float) -> tuple[int, float]:
    """(window index, seconds left in it)."""
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


def decide(
    plan: Plan,
    *,
    requests: int,
    tokens: int,
    streams: int,
    reserve: int,
    new_streams: int,
) -> str | None:
    """Why the request must wait (None: admit). Shared by both implementations' tests."""
    if plan.requests_per_minute is not None and requests + 1 > plan.requests_per_minute:
        return "requests"
    tpm = plan.tokens_per_minute
    if tpm is not None and tokens > 0 and tokens + reserve > tpm:
        return "tokens"
    mcs = plan.max_concurrent_streams
    if mcs is not None and streams + new_streams > mcs:
        return "streams"
    return None


# The `reason` label of batchserve_rejections_total.
_REASONS: dict[str, RejectionReason] = {
    "requests": "rate",
    "tokens": "tokens",
    "streams": "concurrency",
}
_MESSAGES = {
    "requests": "Rate limited: requests per minute exceeded for this plan",
    "tokens": "Rate limited: tokens per minute exceeded for this plan",
    "streams": "Rate limited: too many concurrent requests for this plan",
}


def limited(reason: str, plan: Plan, state: RateState) -> TenantRateLimited:
    # A stream ends at an unknown time: ask the client to retry in a second.
    retry = 1.0 if reason == "streams" else state.reset_s
    return TenantRateLimited(
        _MESSAGES[reason], retry_after_s=retry, reason=_REASONS[reason], state=state
    )


def counts_nothing(plan: Plan) -> bool:
    """No request or token limit: the X-RateLimit-* headers would be empty."""
    return plan.requests_per_minute is None and plan.tokens_per_minute is None


def state_of(plan: Plan, *, requests: int, tokens: int, reset_s: float) -> RateState:
    rpm, tpm = plan.requests_per_minute, plan.tokens_per_minute
    return RateState(
        requests_limit=rpm,
        requests_remaining=None if rpm is None else rpm - requests,
        tokens_limit=tpm,
        tokens_remaining=None if tpm is None else tpm - tokens,
        reset_s=reset_s,
    )


@dataclass
class _Counters:
    window: int
    requests: int = 0
    tokens: int = 0


class InMemoryRateLimiter:
    """One gateway's own counters (the embedded single-replica default)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counters: dict[str, _Counters] = {}
        self._streams: dict[str, int] = {}

    def _current(self, tenant_id: str, window: int) -> _Counters:
        counters = self._counters.get(tenant_id)
        if counters is None or counters.window != window:
            counters = self._counters[tenant_id] = _Counters(window)
        return counters

    async def admit(
        self, tenant: Tenant, request_id: str, reserve_tokens: int, *, streams: int = 1
    ) -> Reservation:
        plan = tenant.plan
        window, reset_s = window_of(self._clock())
        c = self._current(tenant.tenant_id, window)
        active = self._streams.get(tenant.tenant_id, 0)
        reason = decide(
            plan,
            requests=c.requests,
            tokens=c.tokens,
            streams=active,
            reserve=reserve_tokens,
            new_streams=streams,
        )
        if reason is not None:
            raise limited(reason, plan, state_of(plan, requests=c.requests, tokens=c.tokens,
                                                  reset_s=reset_s))  # fmt: skip
        c.requests += 1
        c.tokens += reserve_tokens
        self._streams[tenant.tenant_id] = active + streams
        state = state_of(plan, requests=c.requests, tokens=c.tokens, reset_s=reset_s)
        return Reservation(
            tenant.tenant_id, request_id, window, reserve_tokens, state, streams=streams
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if not reservation.counted:
            return
        tid = reservation.tenant_id
        self._streams[tid] = max(0, self._streams.get(tid, 0) - reservation.streams)
        c = self._counters.get(tid)
        if c is not None and c.window == reservation.window:
            c.tokens = max(0, c.tokens + used_tokens - reservation.reserved_tokens)

    async def peek(self, tenant: Tenant) -> RateState:
        window, reset_s = window_of(self._clock())
        c = self._counters.get(tenant.tenant_id)
        requests, tokens = (
            (c.requests, c.tokens) if c is not None and c.window == window else (0, 0)
        )
        return state_of(tenant.plan, requests=requests, tokens=tokens, reset_s=reset_s)

    def active_streams(self, tenant_id: str) -> int:
        return self._streams.get(tenant_id, 0)
