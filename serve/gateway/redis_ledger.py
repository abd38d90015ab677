"""`UsageLedger` on Redis: every replica's usage in one place.

Per account: a stream of records (`XRANGE` by time answers the usage route)
and a hash of all-time per-model counters. One Lua script writes both after a
`SET NX` on the request id, so a record is never counted twice. Run Redis with
AOF on (`appendonly yes`) for durability. When Redis cannot be reached the
record goes to the local fallback ledger (SQLite) instead of being lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from serve.gateway.ledger import ModelTotals, UsageLedger, UsageRecord

log = logging.getLogger(__name__)

KEY_PREFIX = "batchserve:usage"
DEDUPE_TTL_S = 7 * 24 * 3600
_PAGE = 1000

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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLedger:
    def __init__(
        self,
        client: Any,
        *,
        timeout_s: float,
        fallback: UsageLedger | None = None,
        on_error: Callable[[str], None] = lambda action: None,
    ) -> None:
        self._redis = client
        self._timeout_s = timeout_s
        self._fallback = fallback
        self._on_error = on_error
        self._record = client.register_script(_RECORD)

    @staticmethod
    def keys(request_id: str, account_id: str) -> list[str]:
        acct = f"{KEY_PREFIX}:{{{account_id}}}"
        return [f"{acct}:rid:{request_id}", f"{acct}:stream", f"{acct}:totals"]

    async def record(self, record: UsageRecord) -> None:
        from redis.exceptions import RedisError

        fields: list[Any] = []
        for name, value in vars(record).items():
            fields += [name, "" if value is None else str(value)]
        args = [DEDUPE_TTL_S, record.model, record.prompt_tokens, record.completion_tokens]
        try:
            await asyncio.wait_for(
                self._record(keys=self.keys(record.request_id, record.account_id),
                             args=args + fields),
                self._timeout_s * 8,
            )  # fmt: skip
        except (RedisError, OSError, TimeoutError) as err:
            self._on_error("ledger")
            log.warning("usage record for %s not written to Redis (%s)", record.request_id,
                        type(err).__name__)  # fmt: skip
            if self._fallback is None:
                raise
            await self._fallback.record(record)

    async def totals(self, account_id: str, since: float, until: float) -> Sequence[ModelTotals]:
        stream = self.keys("", account_id)[1]
        start, end = f"{int(since * 1000)}", f"({int(until * 1000)}"
        sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        while True:
            page = await self._redis.xrange(stream, min=start, max=end, count=_PAGE)
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

    async def close(self) -> None:
        await self._redis.aclose()
        if self._fallback is not None:
            await self._fallback.close()
