"""`UsageLedger` on Redis: every replica's usage in one place.

Per account: a stream of records (`XRANGE` by time answers the usage route)
and a hash of all-time per-model counters. One Lua script writes both after a
`SET NX` on the request id, so a record is never counted twice. Run Redis with
AOF on (`appendonly yes`) for durability. When Redis cannot be reached the
record goes to the local fallback ledger (SQLite) instead of being lost.

Write-ahead (see `serve.gateway.ledger`): each ledger is an owner with a hash of
its open entries (request id -> entry), an `alive` key that expires
`dead_after_s` after its last heartbeat, and a place in the set of owners; all
three share the `{owners}` hash tag (one slot). Admission writes the open entry
and refreshes `alive` in one script (one round trip); a final record does not
wait for the entry's removal: the next heartbeat deletes the ended requests'
entries in bulk. A sweep reads the set of owners, finds those whose `alive` key
expired, and writes each open entry's `replica_lost` record through the same
`SET NX` script as every record (so two sweepers, or a sweeper and a late final
record, never count a request twice), then deletes the entries and, once the
hash is empty and the owner still dead, the owner.

Records the fallback took while Redis was away are handed on once it answers again: each
heartbeat that reaches Redis moves a page of them (written through the same `SET NX`
script, so a record that had landed after all is not counted twice), then deletes them
locally. Until then the usage route, which reads Redis, does not count them; a replica's
local file would otherwise keep them from it for good.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Any, Literal, TypeVar

from serve.gateway.ledger import ModelTotals, OpenRequest, UsageRecord
from serve.gateway.ledger_liveness import Liveness, LivenessTimers, new_owner_id
from serve.gateway.sqlite_ledger import SqliteLedger

log = logging.getLogger(__name__)

KEY_PREFIX = "batchserve:usage"
OWNERS_PREFIX = f"{KEY_PREFIX}:{{owners}}"
DEDUPE_TTL_S = 7 * 24 * 3600
_PAGE = 1000
# Ended requests whose open entries one heartbeat call deletes, at most.
_FORGET_PER_CALL = 1000
# Fallback records one heartbeat hands on to Redis, at most.
_HAND_ON_PER_BEAT = 500
# At stop: how long the last hand-on may take, and how many records left behind are logged.
_STOP_HAND_ON_S = 5.0
_LOGGED_AT_STOP = 10_000

_T = TypeVar("_T")

# KEYS: dedupe key, account stream, account totals hash
# ARGV: dedupe ttl, model, prompt tokens, completion tokens, then field/value pairs
_RECORD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|requests', 1)
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|prompt_tokens', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], ARGV[2] .. '|completion_tokens', tonumber(ARGV[4]))
return 1
"""

# KEYS: owner's alive key, owners set, owner's open hash
# ARGV: alive ttl (ms), owner, then the request id and entry to open (or '' and ''),
#       then request ids whose entries are done with
_BEAT = """
redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[1]))
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], ARGV[4]) end
for i = 5, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
return 1
"""

# KEYS: owner's alive key, owner's open hash, owners set; ARGV: owner
_DROP_OWNER = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HLEN', KEYS[2]) == 0 then
  return redis.call('SREM', KEYS[3], ARGV[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def owner_keys(owner: str) -> tuple[str, str, str]:
    """The owner's `alive` key, the set of owners, the owner's open entries."""
    return (f"{OWNERS_PREFIX}:alive:{owner}", f"{OWNERS_PREFIX}:set",
            f"{OWNERS_PREFIX}:open:{owner}")  # fmt: skip


class RedisLedger:
    def __init__(
        self,
        client: Any,
        *,
        timeout_s: float,
        fallback: SqliteLedger | None = None,
        on_error: Callable[[str], None] = lambda action: None,
        timers: LivenessTimers | None = None,
        owner: str | None = None,
        cooldown_s: float = 2.0,
    ) -> None:
        self._redis = client
        self._timeout_s = timeout_s
        self._fallback = fallback
        self._on_error = on_error
        self._timers = timers or LivenessTimers()
        self.owner = owner or new_owner_id()
        self._cooldown_s = cooldown_s
        self._down_until = 0.0
        self._record = client.register_script(_RECORD)
        self._beat = client.register_script(_BEAT)
        self._drop_owner = client.register_script(_DROP_OWNER)
        # Where each running request's open entry went; bounded by the requests in flight.
        self._opened: dict[str, Literal["redis", "local"]] = {}
        # Ended requests whose Redis open entries the next heartbeat deletes.
        self._ended: set[str] = set()
        # The fallback may hold records for Redis: at start (a file kept from before, or
        # shared with a replica that wrote there) and after each write to it.
        self._fallback_pending = fallback is not None
        self.liveness = Liveness("usage ledger (Redis)", self._timers, self.beat, self.sweep)

    @staticmethod
    def keys(request_id: str, account_id: str) -> list[str]:
        acct = f"{KEY_PREFIX}:{{{account_id}}}"
        return [f"{acct}:rid:{request_id}", f"{acct}:stream", f"{acct}:totals"]

    async def _bounded(self, call: Coroutine[Any, Any, _T]) -> _T:
        # A few round trips' worth of the timeout, whatever the socket does.
        return await asyncio.wait_for(call, self._timeout_s * 8)

    async def _write(self, record: UsageRecord) -> bool:
        """The record, unless one with its request id exists (then False)."""
        fields: list[Any] = []
        for name, value in vars(record).items():
            fields += [name, "" if value is None else str(value)]
        args = [DEDUPE_TTL_S, record.model, record.prompt_tokens, record.completion_tokens]
        written = await self._bounded(
            self._record(keys=self.keys(record.request_id, record.account_id), args=args + fields)
        )
        return bool(int(written))

    def _beat_args(self, entry: OpenRequest | None, ended: Sequence[str]) -> list[Any]:
        opened = ["", ""] if entry is None else [entry.request_id, json.dumps(asdict(entry))]
        return [int(self._timers.dead_after_s * 1000), self.owner, *opened, *ended]

    async def open(self, entry: OpenRequest) -> None:
        from redis.exceptions import RedisError

        self.liveness.ensure_running()
        if time.monotonic() >= self._down_until:
            self._opened[entry.request_id] = "redis"
            try:
                await asyncio.wait_for(
                    self._beat(keys=owner_keys(self.owner), args=self._beat_args(entry, ())),
                    self._timeout_s * 4,
                )
                return
            except (RedisError, OSError, TimeoutError) as err:
                self._ended.add(entry.request_id)  # in case it landed after all
                self._down_until = time.monotonic() + self._cooldown_s
                self._on_error("ledger")
                log.warning("open usage entry for %s not written to Redis (%s)",
                            entry.request_id, type(err).__name__)  # fmt: skip
        if self._fallback is None:
            self._opened.pop(entry.request_id, None)
            return
        self._opened[entry.request_id] = "local"
        await self._fallback.open(entry)

    async def record(self, record: UsageRecord) -> None:
        from redis.exceptions import RedisError

        opened = self._opened.pop(record.request_id, None)
        if opened == "redis":
            self._ended.add(record.request_id)
        try:
            await self._write(record)
        except (RedisError, OSError, TimeoutError) as err:
            self._on_error("ledger")
            log.warning("usage record for %s not written to Redis (%s)", record.request_id,
                        type(err).__name__)  # fmt: skip
            if self._fallback is None:
                raise
            await self._fallback.record(record)  # also replaces a local open entry
            self._fallback_pending = True
            return
        if opened == "local" and self._fallback is not None:
            await self._fallback.forget(record.request_id)

    async def beat(self) -> None:
        from redis.exceptions import RedisError

        ended = list(self._ended)
        for i in range(0, max(len(ended), 1), _FORGET_PER_CALL):
            chunk = ended[i : i + _FORGET_PER_CALL]
            await self._bounded(
                self._beat(keys=owner_keys(self.owner), args=self._beat_args(None, chunk))
            )
            self._ended.difference_update(chunk)
        # The heartbeat has landed: a hand-on that fails or runs long is not a failed or
        # late heartbeat (which would hold this owner's sweeps back, or let the other owners
        # take it for dead and record its running requests as lost).
        try:
            await self._hand_on(time.monotonic() + self._timers.dead_after_s / 4)
        except (RedisError, OSError, TimeoutError, sqlite3.Error) as err:
            self._on_error("ledger")
            log.warning("usage records of the local fallback not handed on to Redis yet (%s)",
                        type(err).__name__)  # fmt: skip

    async def _hand_on(self, deadline: float) -> int:
        """Move a page of the fallback's records to Redis (Redis answered just now), as many
        as are written before `deadline` (monotonic)."""
        if self._fallback is None or not self._fallback_pending:
            return 0
        # Cleared before the read, not after: a record that falls back while this page is
        # handed on (`record` awaits beside the heartbeat) sets it again for the next beat.
        self._fallback_pending = False
        records: list[UsageRecord] = []
        try:
            page = await self._fallback.oldest(_HAND_ON_PER_BEAT)
            for record in page:
                if time.monotonic() >= deadline:
                    break
                await self._write(record)  # SET NX: one already there is not counted again
                records.append(record)
            await self._fallback.drop([r.request_id for r in records])
        except BaseException:
            self._fallback_pending = True  # nothing dropped: the next beat tries again
            raise
        if len(page) >= _HAND_ON_PER_BEAT or len(records) < len(page):
            self._fallback_pending = True  # more than a page, or out of time
        if records:
            log.info("%d usage records written while Redis was away handed on to it",
                     len(records))  # fmt: skip
        return len(records)

    async def sweep(self) -> int:
        """Finalize the open entries of dead owners; returns how many records it wrote."""
        _, owners_key, _ = owner_keys(self.owner)
        owners = [_text(o) for o in await self._bounded(self._redis.smembers(owners_key))]
        owners = [o for o in owners if o != self.owner]
        if not owners:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for other in owners:
                pipe.exists(owner_keys(other)[0])
            alive = await self._bounded(pipe.execute())
        lost = 0
        for other, is_alive in zip(owners, alive, strict=True):
            if int(is_alive):
                continue
            alive_key, _, open_key = owner_keys(other)
            # One dead owner's requests in flight: bounded by its engine slots.
            entries = await self._bounded(self._redis.hgetall(open_key))
            noticed_at = time.time()
            for request_id, raw in entries.items():
                try:
                    entry = OpenRequest(**json.loads(_text(raw)))
                except (ValueError, TypeError):
                    log.error("unreadable open usage entry %s of %s dropped",
                              _text(request_id), other)  # fmt: skip
                else:
                    lost += await self._write(entry.lost(noticed_at))
                await self._bounded(self._redis.hdel(open_key, request_id))
            await self._bounded(
                self._drop_owner(keys=[alive_key, open_key, owners_key], args=[other])
            )
        return lost

    async def totals(self, account_id: str, since: float, until: float) -> Sequence[ModelTotals]:
        stream = self.keys("", account_id)[1]
        start, end = f"{int(since * 1000)}", f"({int(until * 1000)}"
        sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        while True:
            page = await self._bounded(self._redis.xrange(stream, min=start, max=end, count=_PAGE))
            for _entry_id, fields in page:
                f = {_text(k): _text(v) for k, v in fields.items()}
                row = sums[f["model"]]
                row[0] += 1
                row[1] += int(f["prompt_tokens"])
                row[2] += int(f["completion_tokens"])
            if len(page) < _PAGE:
                break
            start = f"({_text(page[-1][0])}"
        return [ModelTotals(m, r[0], r[1], r[2]) for m, r in sorted(sums.items())]

    async def start(self) -> None:
        self.liveness.ensure_running()
        if self._fallback is not None:
            await self._fallback.start()

    async def stop(self) -> None:
        from redis.exceptions import RedisError

        await self.liveness.stop()
        try:  # gone: whatever is still open here can be finalized at once
            alive_key, _, open_key = owner_keys(self.owner)
            ended = list(self._ended)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(alive_key)
                if ended:
                    pipe.hdel(open_key, *ended)
                await self._bounded(pipe.execute())
            self._ended.difference_update(ended)
        except (RedisError, OSError, TimeoutError) as err:
            log.warning("usage ledger owner %s not marked gone (%s)", self.owner,
                        type(err).__name__)  # fmt: skip
        if self._fallback is not None:
            try:
                await self._hand_on_at_stop()
            finally:
                await self._fallback.stop()

    async def _hand_on_at_stop(self) -> None:
        """A last hand-on of the fallback's final records (for up to `_STOP_HAND_ON_S`);
        those Redis could not take are logged, one JSON record a line: the fallback may
        live in the pod's own storage, gone with it (a later replica sharing the file hands
        them on, and Redis counts one already there once). Open entries are not: requests
        still running here are ended, and recorded, before the ledger stops."""
        from redis.exceptions import RedisError

        assert self._fallback is not None
        deadline = time.monotonic() + _STOP_HAND_ON_S
        try:
            while self._fallback_pending and time.monotonic() < deadline:
                if not await self._hand_on(deadline):
                    break
        except (RedisError, OSError, TimeoutError, sqlite3.Error) as err:
            log.warning("usage records of the local fallback not handed on at stop (%s)",
                        type(err).__name__)  # fmt: skip
        try:
            left = await self._fallback.oldest(_LOGGED_AT_STOP)
        except sqlite3.Error as err:
            log.error("usage records of the local fallback unreadable at stop (%s)", err)
            return
        if not left:
            return
        log.error("%s%d usage records written while Redis was away are still only in the "
                  "local fallback as this replica stops; each follows on a line of its own",
                  "at least " if len(left) == _LOGGED_AT_STOP else "", len(left))  # fmt: skip
        for record in left:
            log.error("usage record not in Redis: %s", json.dumps(asdict(record)))

    async def close(self) -> None:
        try:
            await self.stop()
        finally:
            await self._redis.aclose()
            if self._fallback is not None:
                await self._fallback.close()
