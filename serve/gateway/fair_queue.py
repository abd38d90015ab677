"""Fair sharing of a replica's engine slots between tenants.

A request takes slots (one per choice) while it generates. When it cannot
start at once it waits in its tenant's bounded queue, and each freed slot goes
to the waiting tenant that holds the fewest slots for its plan weight (ties:
the one served least so far, in weighted virtual time; then arrival order). So
a tenant sending 8x the load of another gets no more than its share, and
holdings converge to the weights whenever both are backlogged.

`reserved` slots are never filled by one tenant alone: a tenant holding
`capacity - reserved` waits even when slots are free, so another tenant's
first request starts at once instead of waiting for a flood's request to end.

A request that would have to wait is refused at once (429 with a Retry-After
estimated from how long slots are held) when its tenant's queue is full or when
`max_queued_total` requests of all tenants are already waiting; so is a wait longer
than `max_wait_s`. `refusal` tells before the request is even read.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

from serve.errors import BatchserveError, OutOfCapacity, TenantRateLimited

_EMA = 0.2


@dataclass
class _Waiter:
    slots: int
    seq: int
    future: asyncio.Future[None]


@dataclass
class _Tenant:
    weight: int
    held: int = 0
    vtime: float = 0.0
    waiters: deque[_Waiter] = field(default_factory=deque)


@dataclass
class Lease:
    """Slots held by one request; `release` is idempotent."""

    queue: FairQueue
    tenant_id: str
    slots: int
    granted_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.queue._free(self.tenant_id, self.slots, time.monotonic() - self.granted_at)


class FairQueue:
    def __init__(
        self,
        capacity: int,
        *,
        max_queued_per_tenant: int,
        max_wait_s: float,
        retry_after_s: float = 1.0,
        reserved: int = 0,
        max_queued_total: int | None = None,
    ) -> None:
        if not 0 <= reserved < capacity:
            raise ValueError("reserved slots must be fewer than the capacity")
        self.capacity = capacity
        self.reserved = reserved
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_queued_total = max_queued_total
        self.queued = 0  # waiters of all tenants
        self.max_wait_s = max_wait_s
        self.in_use = 0
        self._min_retry_s = retry_after_s
        self._hold_s = retry_after_s  # moving average of how long a lease is held
        self._tenants: dict[str, _Tenant] = {}  # tenants holding or waiting for slots
        self._seq = itertools.count()

    def queued_for(self, tenant_id: str) -> int:
        state = self._tenants.get(tenant_id)
        return len(state.waiters) if state is not None else 0

    def held_by(self, tenant_id: str) -> int:
        state = self._tenants.get(tenant_id)
        return state.held if state is not None else 0

    def retry_after_s(self) -> float:
        """Roughly when a slot frees for a newcomer: hold time x waiters per slot."""
        per_slot = (self.queued + 1) / max(self.capacity, 1)
        return max(self._min_retry_s, math.ceil(self._hold_s * per_slot))

    async def acquire(
        self, tenant_id: str, *, weight: int = 1, slots: int = 1, wait: bool = True
    ) -> Lease:
        """Slots for one request: at once, after a wait in the tenant's queue, or a 429.
        `wait=False` (Workers AI `options.rejectIfBusy`) refuses what would have to wait."""
        if slots > self.capacity:
            raise OutOfCapacity(retry_after_s=self._min_retry_s)
        state = self._tenants.get(tenant_id)
        if state is None:
            state = self._tenants[tenant_id] = _Tenant(weight, vtime=self._virtual_now())
        state.weight = weight
        if not state.waiters and self._fits(state, slots):
            self._take(state, slots)
            return Lease(self, tenant_id, slots)
        refused = self._refusal(state, slots) if wait else self._busy()
        if refused is not None:
            self._forget_if_idle(tenant_id)
            raise refused
        waiter = _Waiter(slots, next(self._seq), asyncio.get_running_loop().create_future())
        state.waiters.append(waiter)
        self.queued += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            self._withdraw(tenant_id, waiter)
            if isinstance(exc, TimeoutError):
                raise TenantRateLimited(
                    "Capacity temporarily exceeded: queued too long, please try again.",
                    retry_after_s=self.retry_after_s(),
                    reason="queue_full",
                ) from None
            raise
        return Lease(self, tenant_id, slots)

    def refusal(self, tenant_id: str, slots: int = 1) -> BatchserveError | None:
        """The error `acquire` would raise at once for this request now, or None (it
        would start or wait). Lets the gateway refuse a burst's excess before reading it."""
        state = self._tenants.get(tenant_id)
        if state is None:
            return None if self.in_use + slots <= self.capacity else self._refusal(None, slots)
        if not state.waiters and self._fits(state, slots):
            return None
        return self._refusal(state, slots)

    def _refusal(self, state: _Tenant | None, slots: int) -> BatchserveError | None:
        """For a request that cannot start at once: refuse it rather than queue it?"""
        if state is not None and len(state.waiters) >= self.max_queued_per_tenant:
            return TenantRateLimited(
                "Rate limited: too many queued requests for this tenant",
                retry_after_s=self.retry_after_s(),
                reason="queue_full",
            )
        if self.max_queued_total is not None and self.queued >= self.max_queued_total:
            return OutOfCapacity(
                "Capacity temporarily exceeded, please try again.",
                retry_after_s=self.retry_after_s(),
                reason="queue_full",
            )
        return None

    def _busy(self) -> BatchserveError:
        """The refusal of a request that asked not to wait (`rejectIfBusy`)."""
        return OutOfCapacity(retry_after_s=self.retry_after_s(), reason="capacity")

    def _fits(self, state: _Tenant, slots: int) -> bool:
        if self.in_use + slots > self.capacity:
            return False
        return state.held == 0 or state.held + slots <= self.capacity - self.reserved

    def _take(self, state: _Tenant, slots: int) -> None:
        self.in_use += slots
        state.held += slots
        state.vtime += slots / state.weight

    def _virtual_now(self) -> float:
        """A newcomer starts level with the least-served tenant present: no saved credit."""
        return min((t.vtime for t in self._tenants.values()), default=0.0)

    def _forget_if_idle(self, tenant_id: str) -> None:
        state = self._tenants.get(tenant_id)
        if state is not None and state.held == 0 and not state.waiters:
            del self._tenants[tenant_id]

    def _withdraw(self, tenant_id: str, waiter: _Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            # Granted just as we gave up: hand the slots back.
            self._free(tenant_id, waiter.slots, 0.0)
            return
        waiter.future.cancel()
        state = self._tenants.get(tenant_id)
        if state is not None and waiter in state.waiters:
            state.waiters.remove(waiter)
            self.queued -= 1
            self._forget_if_idle(tenant_id)
        self._grant()

    def _free(self, tenant_id: str, slots: int, held_s: float) -> None:
        self.in_use -= slots
        state = self._tenants.get(tenant_id)
        if state is not None:
            state.held -= slots
            self._forget_if_idle(tenant_id)
        if held_s > 0:
            self._hold_s = (1 - _EMA) * self._hold_s + _EMA * held_s
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the waiting tenants that hold least for their weight."""
        while self.in_use < self.capacity:
            ready = [
                (t.held / t.weight, t.vtime, t.waiters[0].seq, tid)
                for tid, t in self._tenants.items()
                if t.waiters and self._fits(t, t.waiters[0].slots)
            ]
            if not ready:
                return
            tenant_id = min(ready)[3]
            state = self._tenants[tenant_id]
            waiter = state.waiters.popleft()
            self.queued -= 1
            self._take(state, waiter.slots)
            waiter.future.set_result(None)
