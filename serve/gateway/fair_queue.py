"""Fair sharing of a replica's engine slots between tenants.

A request takes slots (one per choice) while it generates. When all slots are
taken, it waits in its tenant's bounded queue; freed slots go to the tenants
round-robin, `weight` grants per turn (the plan's weight), so a tenant sending
8x the load of another gets no more than its turn. A full queue, or a wait
longer than `max_wait_s`, is a 429 with a Retry-After estimated from how long
slots are held.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from serve.errors import OutOfCapacity, TenantRateLimited

_EMA = 0.2


@dataclass
class _Waiter:
    slots: int
    future: asyncio.Future[None]


@dataclass
class Lease:
    """Slots held by one request; `release` is idempotent."""

    queue: FairQueue
    slots: int
    granted_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.queue._free(self.slots, time.monotonic() - self.granted_at)


class FairQueue:
    def __init__(
        self,
        capacity: int,
        *,
        max_queued_per_tenant: int,
        max_wait_s: float,
        retry_after_s: float = 1.0,
    ) -> None:
        self.capacity = capacity
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_wait_s = max_wait_s
        self.in_use = 0
        self._min_retry_s = retry_after_s
        self._hold_s = retry_after_s  # moving average of how long a lease is held
        self._queues: dict[str, deque[_Waiter]] = {}
        self._weights: dict[str, int] = {}
        self._turns: deque[str] = deque()  # tenants with waiters, in turn order
        self._credit: dict[str, int] = {}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_for(self, tenant_id: str) -> int:
        return len(self._queues.get(tenant_id, ()))

    def retry_after_s(self) -> float:
        """Roughly when a slot frees for a newcomer: hold time x waiters per slot."""
        per_slot = (self.queued + 1) / max(self.capacity, 1)
        return max(self._min_retry_s, math.ceil(self._hold_s * per_slot))

    async def acquire(self, tenant_id: str, *, weight: int = 1, slots: int = 1) -> Lease:
        if slots > self.capacity:
            raise OutOfCapacity(retry_after_s=self._min_retry_s)
        if not self._turns and self.in_use + slots <= self.capacity:
            self.in_use += slots
            return Lease(self, slots)
        queue = self._queues.setdefault(tenant_id, deque())
        if len(queue) >= self.max_queued_per_tenant:
            if not queue:
                self._queues.pop(tenant_id, None)
            raise TenantRateLimited(
                "Rate limited: too many queued requests for this tenant",
                retry_after_s=self.retry_after_s(),
                reason="queue_full",
            )
        waiter = _Waiter(slots, asyncio.get_running_loop().create_future())
        queue.append(waiter)
        self._weights[tenant_id] = weight
        if tenant_id not in self._credit:
            self._credit[tenant_id] = weight
            self._turns.append(tenant_id)
        self._grant()
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
        return Lease(self, slots)

    def _withdraw(self, tenant_id: str, waiter: _Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            # Granted just as we gave up: hand the slots back.
            self._free(waiter.slots, 0.0)
            return
        waiter.future.cancel()
        queue = self._queues.get(tenant_id)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                self._drop_turn(tenant_id)
        self._grant()

    def _drop_turn(self, tenant_id: str) -> None:
        self._queues.pop(tenant_id, None)
        self._credit.pop(tenant_id, None)
        if tenant_id in self._turns:
            self._turns.remove(tenant_id)

    def _free(self, slots: int, held_s: float) -> None:
        self.in_use -= slots
        if held_s > 0:
            self._hold_s = (1 - _EMA) * self._hold_s + _EMA * held_s
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiters: the tenant whose turn it is, `weight` times, then next."""
        while self._turns:
            tenant_id = self._turns[0]
            queue = self._queues[tenant_id]
            waiter = queue[0]
            if self.in_use + waiter.slots > self.capacity:
                return
            queue.popleft()
            self.in_use += waiter.slots
            waiter.future.set_result(None)
            self._credit[tenant_id] -= 1
            if not queue:
                self._drop_turn(tenant_id)
            elif self._credit[tenant_id] <= 0:
                self._turns.rotate(-1)
                self._credit[tenant_id] = self._weights.get(tenant_id, 1)
