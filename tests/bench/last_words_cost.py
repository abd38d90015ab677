"""What `LastWordsMarks` adds to each response write (not a test):

    .venv/bin/python -m tests.bench.last_words_cost

The server's `send` for one SSE frame, awaited `--writes` times through the middleware and
straight, interleaved in `--rounds` rounds on one event loop; the send itself does nothing,
so the difference is the middleware's own cost per write (two stores into the shared map,
a look at the transport's buffer). Printed: ns per write each way, and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import statistics
import time
from typing import Any, cast

from starlette.types import Message, Receive, Scope, Send

from serve.gateway.last_words import SLOT_EXTENSION, LastWordsMarks, Slot

FRAME = b'data: {"response":"word"}\n\n'


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


async def _nothing(message: Message) -> None:
    return None


async def _receive() -> Message:
    return {"type": "http.disconnect"}


def _streamer(writes: int) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        body = {"type": "http.response.body", "body": FRAME, "more_body": True}
        for _ in range(writes):
            await send(body)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def _time(app: Any, scope: Scope) -> float:
    started = time.perf_counter_ns()
    await app(scope, _receive, _nothing)
    return time.perf_counter_ns() - started


async def main(writes: int, rounds: int) -> None:
    states = mmap.mmap(-1, 16)
    slot = Slot.__new__(Slot)  # no socket behind it: only the per-write path is timed
    slot.index, slot.transport, slot._states = 1, cast(Any, _Transport()), states
    slot.owner = None
    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "extensions": {SLOT_EXTENSION: {"slot": slot}}}  # fmt: skip
    bare, marked = _streamer(writes), LastWordsMarks(_streamer(writes))
    per_write: dict[str, list[float]] = {"bare": [], "marked": []}
    for _ in range(rounds):
        per_write["bare"].append(await _time(bare, scope) / writes)
        per_write["marked"].append(await _time(marked, scope) / writes)
    b, m = statistics.median(per_write["bare"]), statistics.median(per_write["marked"])
    print(f"per write, median of {rounds} rounds of {writes}: straight {b:.0f} ns, "
          f"through LastWordsMarks {m:.0f} ns, added {m - b:.0f} ns")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    asyncio.run(main(args.writes, args.rounds))
