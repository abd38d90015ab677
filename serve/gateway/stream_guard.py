"""Streams to clients that stop reading: bounded buffering, then an abort.

The body is pulled one frame at a time and only after the previous frame was handed
to the server, so while a client does not read, the generation is suspended and the
gateway holds at most one frame beyond the server's transport buffer (uvicorn pauses
writers above its 64 KiB high-water mark). If one write stays blocked for `stall_s`,
the stream is aborted: the body iterator is closed (which aborts the engine request
and frees its KV blocks) and the connection is dropped without a final frame.

Per frame this costs one `time.monotonic()`; the watch itself is one sleeping task
per stream that wakes every `stall_s / 4`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Send

log = logging.getLogger(__name__)


class GuardedStreamingResponse(StreamingResponse):
    """A `StreamingResponse` that aborts when the client stops taking frames."""

    def __init__(self, content: Any, *, stall_s: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.stall_s = stall_s
        self.stalled = False
        # When the pending write started (None: no write pending).
        self._blocked_since: float | None = None

    async def stream_response(self, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            self._blocked_since = time.monotonic()
            await send(message)
            self._blocked_since = None

        async with anyio.create_task_group() as group:
            group.start_soon(self._watch, group.cancel_scope)
            try:
                await super().stream_response(timed_send)
            finally:
                group.cancel_scope.cancel()
        if self.stalled:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # runs the generation's cleanup: the engine request is aborted

    async def _watch(self, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.stall_s / 4)
            since = self._blocked_since
            if since is not None and time.monotonic() - since >= self.stall_s:
                self.stalled = True
                log.warning("client stopped reading its stream for %.0f s; aborting", self.stall_s)
                scope.cancel()
                return
