"""SSE heartbeats while a stream waits for its first frame (queueing, a long prefill).

Only the wait for the first frame is timed: after it, frames pass straight through,
so a running stream pays nothing per token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from serve import sse


async def heartbeat_until_first(
    frames: AsyncGenerator[bytes, None], interval_s: float
) -> AsyncGenerator[bytes, None]:
    """`frames`, preceded by one `sse.HEARTBEAT` per `interval_s` spent waiting for the first."""
    first: asyncio.Future[bytes] = asyncio.ensure_future(anext(frames))
    try:
        while not first.done():
            done, _ = await asyncio.wait({first}, timeout=interval_s)
            if not done:
                yield sse.HEARTBEAT
        try:
            head = first.result()
        except StopAsyncIteration:
            return
        yield head
        async for frame in frames:
            yield frame
    finally:
        if not first.done():
            # Client gone during the wait: cancelling the pending step runs the producer's
            # cleanup (which aborts the engine request) before we return.
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await first
        await frames.aclose()
