"""`RateLimiter` on Redis: the counters several gateway replicas share.

Each admission is one Lua script (atomic on the server): check the tenant's
request and token counters of the current minute and its live stream leases,
then count the request. Redis unreachable: the `fail_open` setting decides
(admit uncounted, or 503), the failure is logged and counted, and short socket
timeouts plus a brief circuit breaker keep every request bounded in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from serve.errors import RateLimiterUnavailable
from serve.gateway.ratelimit import (
    STREAM_LEASE_S,
    WINDOW_S,
    RateState,
    Reservation,
    counts_nothing,
    limited,
    state_of,
    window_of,
)
from serve.gateway.tenants import Tenant

log = logging.getLogger(__name__)

KEY_PREFIX = "batchserve:rl"

# KEYS: requests counter, tokens counter, stream leases (zset: member -> lease end, ms)
# ARGV: rpm, tpm, max streams (-1 = none), reserve, ttl s, request id, now ms, lease ms,
#       new streams
_ADMIT = """
local rpm, tpm, mcs = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local now, lease, n = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local reqs = tonumber(redis.call('GET', KEYS[1]) or '0')
local toks = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local streams = redis.call('ZCARD', KEYS[3])
if rpm >= 0 and reqs + 1 > rpm then return {0, 'requests', reqs, toks} end
if tpm >= 0 and toks > 0 and toks + reserve > tpm then return {0, 'tokens', reqs, toks} end
if mcs >= 0 and streams + n > mcs then return {0, 'streams', reqs, toks} end
reqs = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ttl)
toks = redis.call('INCRBY', KEYS[2], reserve)
redis.call('EXPIRE', KEYS[2], ttl)
for i = 1, n do redis.call('ZADD', KEYS[3], now + lease, ARGV[6] .. '#' .. i) end
redis.call('PEXPIRE', KEYS[3], lease)
return {1, '', reqs, toks}
"""

# KEYS: tokens counter of the admission's window, stream leases
# ARGV: token correction, request id, streams
_SETTLE = """
if tonumber(ARGV[1]) ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local v = redis.call('INCRBY', KEYS[1], ARGV[1])
  if v < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
for i = 1, tonumber(ARGV[3]) do redis.call('ZREM', KEYS[2], ARGV[2] .. '#' .. i) end
return 1
"""


def redis_client(url: str, timeout_s: float) -> Any:
    """An asyncio Redis client that gives up fast (no retries, short timeouts)."""
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def _unlimited(limit: int | None) -> int:
    return -1 if limit is None else limit


class RedisRateLimiter:
    def __init__(
        self,
        client: Any,
        *,
        fail_open: bool,
        timeout_s: float,
        on_error: Callable[[str], None] = lambda action: None,
        clock: Callable[[], float] = time.time,
        cooldown_s: float = 2.0,
    ) -> None:
        self._redis = client
        self._fail_open = fail_open
        self._timeout_s = timeout_s
        self._on_error = on_error
        self._clock = clock
        self._cooldown_s = cooldown_s
        self._down_until = 0.0
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)

    @staticmethod
    def keys(tenant_id: str, window: int) -> tuple[str, str, str]:
        base = f"{KEY_PREFIX}:{{{tenant_id}}}"
        return f"{base}:req:{window}", f"{base}:tok:{window}", f"{base}:streams"

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        # Bounded whatever the socket does: a few round trips' worth of the timeout.
        return await asyncio.wait_for(script(keys=keys, args=args), self._timeout_s * 4)

    def _failed(self, what: str, err: BaseException) -> None:
        self._down_until = time.monotonic() + self._cooldown_s
        action = "fail_open" if self._fail_open else "fail_closed"
        self._on_error(action)
        log.warning("rate limiter store unreachable during %s (%s): %s", what, action,
                    type(err).__name__)  # fmt: skip

    def _degraded(
        self, tenant: Tenant, request_id: str, window: int, reset_s: float
    ) -> Reservation:
        if not self._fail_open:
            raise RateLimiterUnavailable()
        state = RateState(None, None, None, None, reset_s)
        return Reservation(tenant.tenant_id, request_id, window, 0, state, counted=False)

    async def admit(
        self, tenant: Tenant, request_id: str, reserve_tokens: int, *, streams: int = 1
    ) -> Reservation:
        from redis.exceptions import RedisError

        plan = tenant.plan
        now = self._clock()
        window, reset_s = window_of(now)
        if time.monotonic() < self._down_until:
            self._on_error("fail_open" if self._fail_open else "fail_closed")
            return self._degraded(tenant, request_id, window, reset_s)
        req_key, tok_key, streams_key = self.keys(tenant.tenant_id, window)
        args = [
            _unlimited(plan.requests_per_minute),
            _unlimited(plan.tokens_per_minute),
            _unlimited(plan.max_concurrent_streams),
            reserve_tokens,
            WINDOW_S * 2,
            request_id,
            int(now * 1000),
            STREAM_LEASE_S * 1000,
            streams,
        ]
        try:
            allowed, reason, reqs, toks = await self._call(
                self._admit, [req_key, tok_key, streams_key], args
            )
        except (RedisError, OSError, TimeoutError) as err:
            self._failed("admission", err)
            return self._degraded(tenant, request_id, window, reset_s)
        state = state_of(plan, requests=int(reqs), tokens=int(toks), reset_s=reset_s)
        if not int(allowed):
            why = reason.decode() if isinstance(reason, bytes) else str(reason)
            raise limited(why, plan, state)
        return Reservation(
            tenant.tenant_id, request_id, window, reserve_tokens, state, streams=streams
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        from redis.exceptions import RedisError

        if not reservation.counted:
            return
        _, tok_key, streams_key = self.keys(reservation.tenant_id, reservation.window)
        correction = used_tokens - reservation.reserved_tokens
        try:
            await self._call(
                self._settle,
                [tok_key, streams_key],
                [correction, reservation.request_id, reservation.streams],
            )
        except (RedisError, OSError, TimeoutError) as err:
            # The stream lease expires by itself; the token count stays as reserved.
            self._failed("settlement", err)

    async def peek(self, tenant: Tenant) -> RateState | None:
        """One MGET of the window's two counters (never a write). Unreachable: None, and
        the circuit breaker opens as for admission (no error metric: nothing was decided)."""
        from redis.exceptions import RedisError

        window, reset_s = window_of(self._clock())
        if counts_nothing(tenant.plan):
            return state_of(tenant.plan, requests=0, tokens=0, reset_s=reset_s)
        if time.monotonic() < self._down_until:
            return None
        req_key, tok_key, _ = self.keys(tenant.tenant_id, window)
        try:
            reqs, toks = await asyncio.wait_for(
                self._redis.mget(req_key, tok_key), self._timeout_s * 4
            )
        except (RedisError, OSError, TimeoutError) as err:
            self._down_until = time.monotonic() + self._cooldown_s
            log.warning("rate limiter store unreachable while reading counters: %s",
                        type(err).__name__)  # fmt: skip
            return None
        return state_of(
            tenant.plan, requests=int(reqs or 0), tokens=int(toks or 0), reset_s=reset_s
        )

    async def close(self) -> None:
        await self._redis.aclose()
