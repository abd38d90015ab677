"""Limiter arithmetic (windows, token reservations, streams) and fair-queue ordering."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from serve.errors import OutOfCapacity, TenantRateLimited
from serve.gateway.fair_queue import FairQueue, Lease
from serve.gateway.ratelimit import InMemoryRateLimiter, RateState
from serve.gateway.tenants import Plan, Tenant


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant(plan: Plan, tid: str = "t") -> Tenant:
    return Tenant(tid, frozenset({"acct"}), plan)


async def test_requests_per_minute_and_exact_retry_after() -> None:
    clock = Clock(6000.0 + 45.5)  # 45.5 s into a window: 14.5 s left
    limiter = InMemoryRateLimiter(clock)
    t = tenant(Plan(requests_per_minute=3))
    states = [(await limiter.admit(t, f"r{i}", 0, streams=0)).state for i in range(3)]
    assert [s.requests_remaining for s in states] == [2, 1, 0]
    with pytest.raises(TenantRateLimited) as caught:
        await limiter.admit(t, "r4", 0)
    assert caught.value.retry_after_s == pytest.approx(14.5)
    assert caught.value.reason == "rate"
    assert isinstance(caught.value.state, RateState)
    assert caught.value.state.headers()["X-RateLimit-Remaining"] == "0"
    assert caught.value.state.headers()["X-RateLimit-Reset"] == "15"
    clock.now = 6060.0  # the next window
    await limiter.admit(t, "r5", 0)


async def test_tokens_reserved_then_settled() -> None:
    clock = Clock(120.0)
    limiter = InMemoryRateLimiter(clock)
    t = tenant(Plan(tokens_per_minute=1000))
    first = await limiter.admit(t, "a", 600)  # prompt + max_tokens
    with pytest.raises(TenantRateLimited) as caught:
        await limiter.admit(t, "b", 600)
    assert caught.value.reason == "tokens"
    await limiter.settle(first, 150)  # it really used 150: 450 come back
    second = await limiter.admit(t, "b", 600)
    assert second.state.tokens_remaining == 1000 - 150 - 600


async def test_oversized_reservation_runs_in_an_empty_window() -> None:
    limiter = InMemoryRateLimiter(Clock(0.0))
    t = tenant(Plan(tokens_per_minute=100))
    await limiter.admit(t, "big", 5000)  # alone in its window: never stuck forever
    with pytest.raises(TenantRateLimited):
        await limiter.admit(t, "next", 1)


async def test_concurrent_streams() -> None:
    limiter = InMemoryRateLimiter(Clock(0.0))
    t = tenant(Plan(max_concurrent_streams=2))
    a = await limiter.admit(t, "a", 1)
    await limiter.admit(t, "b", 1)
    with pytest.raises(TenantRateLimited) as caught:
        await limiter.admit(t, "c", 1)
    assert caught.value.reason == "concurrency" and caught.value.retry_after_s == 1.0
    await limiter.settle(a, 1)
    await limiter.admit(t, "c", 1)
    # n choices take n streams.
    with pytest.raises(TenantRateLimited):
        await limiter.admit(tenant(Plan(max_concurrent_streams=2), "u"), "n3", 1, streams=3)


async def test_tenants_are_counted_apart() -> None:
    limiter = InMemoryRateLimiter(Clock(0.0))
    plan = Plan(requests_per_minute=1)
    await limiter.admit(tenant(plan, "a"), "1", 0)
    await limiter.admit(tenant(plan, "b"), "2", 0)


async def _serve(queue: FairQueue, tid: str, weight: int, order: list[str], hold_s: float) -> None:
    lease = await queue.acquire(tid, weight=weight)
    order.append(tid)
    await asyncio.sleep(hold_s)
    lease.release()


async def test_flooding_tenant_cannot_starve_another() -> None:
    """A queues 8x as many requests as B; B still gets every other slot."""
    queue = FairQueue(2, max_queued_per_tenant=100, max_wait_s=30)
    order: list[str] = []
    tasks = [asyncio.create_task(_serve(queue, "A", 1, order, 0.01)) for _ in range(40)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(_serve(queue, "B", 1, order, 0.01)) for _ in range(5)]
    await asyncio.gather(*tasks)
    # While B is backlogged, the grants alternate: B's 5 come within its first 12 grants.
    b_positions = [i for i, t in enumerate(order) if t == "B"]
    assert len(b_positions) == 5
    assert b_positions[-1] < 2 + 2 * 5 + 1, order
    assert queue.in_use == 0 and queue.queued == 0


async def test_weights_share_slots() -> None:
    queue = FairQueue(1, max_queued_per_tenant=100, max_wait_s=30)
    blocker = await queue.acquire("x")
    order: list[str] = []
    tasks = [asyncio.create_task(_serve(queue, "A", 3, order, 0)) for _ in range(30)]
    tasks += [asyncio.create_task(_serve(queue, "B", 1, order, 0)) for _ in range(30)]
    await asyncio.sleep(0.01)
    blocker.release()
    await asyncio.gather(*tasks)
    first = Counter(order[:20])
    assert first["A"] == 15 and first["B"] == 5, order[:20]


async def test_queue_full_and_wait_timeout_are_429_with_retry_after() -> None:
    queue = FairQueue(1, max_queued_per_tenant=1, max_wait_s=0.2)
    held: Lease = await queue.acquire("A")
    waiting = asyncio.create_task(queue.acquire("A"))
    await asyncio.sleep(0.01)
    with pytest.raises(TenantRateLimited) as full:
        await queue.acquire("A")
    assert full.value.reason == "queue_full" and full.value.retry_after_s >= 1
    with pytest.raises(TenantRateLimited) as waited:
        await waiting
    assert "queued too long" in waited.value.message
    held.release()
    assert queue.in_use == 0 and queue.queued == 0
    with pytest.raises(OutOfCapacity):
        await queue.acquire("A", slots=2)  # can never fit


async def test_cancelled_waiter_gives_its_place_back() -> None:
    queue = FairQueue(1, max_queued_per_tenant=5, max_wait_s=30)
    held = await queue.acquire("A")
    gone = asyncio.create_task(queue.acquire("B"))
    stays = asyncio.create_task(queue.acquire("C"))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    held.release()
    lease = await asyncio.wait_for(stays, 1)
    lease.release()
    lease.release()  # idempotent
    assert queue.in_use == 0 and queue.queued == 0


async def test_freed_slot_goes_to_the_tenant_holding_least() -> None:
    """B's next request arrives just after A's grant; B still gets the next slot although
    A queued first and has more waiting (grants follow holdings, not queue turns)."""
    queue = FairQueue(4, max_queued_per_tenant=100, max_wait_s=30)
    a_leases = [await queue.acquire("A") for _ in range(3)]
    b_lease = await queue.acquire("B")
    a_waiting = [asyncio.create_task(queue.acquire("A")) for _ in range(5)]
    await asyncio.sleep(0)
    b_lease.release()  # B's stream ends; its next request is still on the wire
    await asyncio.sleep(0)
    assert queue.held_by("A") == 4  # the freed slot went to a waiting A (work-conserving)
    b_next = asyncio.create_task(queue.acquire("B"))
    await asyncio.sleep(0)
    a_leases[0].release()
    await asyncio.sleep(0)
    assert queue.held_by("B") == 1 and queue.held_by("A") == 3
    (await asyncio.wait_for(b_next, 1)).release()
    for lease in a_leases[1:]:
        lease.release()
    for task in a_waiting:
        (await task).release()
    assert queue.in_use == 0 and queue.queued == 0 and queue.held_by("A") == 0


async def test_backlogged_tenants_converge_to_equal_holdings() -> None:
    queue = FairQueue(8, max_queued_per_tenant=100, max_wait_s=30)
    order: list[str] = []
    tasks = [asyncio.create_task(_serve(queue, "A", 1, order, 0.005)) for _ in range(80)]
    await asyncio.sleep(0.001)
    tasks += [asyncio.create_task(_serve(queue, "B", 1, order, 0.005)) for _ in range(20)]
    await asyncio.sleep(0.012)  # a few rounds of releases
    assert queue.held_by("B") == 4 and queue.held_by("A") == 4
    await asyncio.gather(*tasks)


async def test_reserved_slots_let_a_newcomer_start_during_a_flood() -> None:
    queue = FairQueue(4, max_queued_per_tenant=100, max_wait_s=30, reserved=1)
    a_leases = [await queue.acquire("A") for _ in range(3)]
    a_waiting = asyncio.create_task(queue.acquire("A"))
    await asyncio.sleep(0)
    assert not a_waiting.done() and queue.in_use == 3  # A alone never fills the reserve
    b_lease = await asyncio.wait_for(queue.acquire("B"), 0.1)  # at once, no A release
    a_leases[0].release()
    lease = await asyncio.wait_for(a_waiting, 1)
    for held in (lease, b_lease, *a_leases[1:]):
        held.release()
    assert queue.in_use == 0 and queue.queued == 0


async def test_a_request_wider_than_the_tenant_cap_still_runs_alone() -> None:
    queue = FairQueue(4, max_queued_per_tenant=100, max_wait_s=30, reserved=1)
    lease = await asyncio.wait_for(queue.acquire("A", slots=4), 0.1)  # n=4 on 4 slots
    lease.release()
    with pytest.raises(ValueError):
        FairQueue(2, max_queued_per_tenant=1, max_wait_s=1, reserved=2)
