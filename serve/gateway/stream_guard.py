"""Clients that stop reading: bounded buffering, then an abort.

Two places watch the same thing, a response write that stays blocked for `stall_s`
because the client does not read:

- `GuardedStreamingResponse`, the gateway's streams. The body is pulled one frame at a
  time and only after the previous frame was handed to the server, so while the write
  blocks the generation is suspended. Past `stall_s` it closes the body iterator (which
  aborts the engine request and frees its KV blocks) and drops the connection. This
  needs a server `send` that blocks (plain uvicorn), so behind Serve the gateway is
  built without it (`stall_s` None) and costs nothing per frame there.
- `StalledClientGuard`, on the HTTP server Ray Serve runs in every replica (installed
  through Serve's HTTP callback, `serve.gateway.serve_http`). With user code on its own
  thread (Serve's default), Serve hands the app's messages to the server through an
  unbounded queue, so the app's writes never block and the guard above never fires:
  a stalled client's whole answer would be generated and queued. This guard watches the
  server's real `send` and, past `stall_s`, tells Serve the client is gone (an
  `http.disconnect` from `receive`, which a replica's server reads for the whole
  request), so Serve cancels the request exactly as for a client that closed: the engine
  request is aborted and the usage record says the client left.

In front of both, HAProxy's `timeout client` (set to `stream_stall_s`, `serve.ingress`)
ends a client whose socket took nothing for that long, which also frees HAProxy's own
buffers and the connection's place in its limits.

Per write this costs one `time.monotonic()`; the watch is a sleeping task (or the
pending `receive`) that wakes every `stall_s / 4`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import ContentStream, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class SendWatch:
    """Times the writes through one `send`: how long the pending one has been blocked."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._blocked_since: float | None = None  # None: no write pending

    async def __call__(self, message: Message) -> None:
        self._blocked_since = time.monotonic()
        try:
            await self._send(message)
        finally:
            self._blocked_since = None

    def stalled(self, stall_s: float) -> bool:
        since = self._blocked_since
        return since is not None and time.monotonic() - since >= stall_s


class GuardedStreamingResponse(StreamingResponse):
    """A `StreamingResponse` that aborts when the client stops taking frames.

    `on_close` is awaited when the response ends, however it ended, after the body is
    closed: it ends what the body never started (a client gone before the first frame
    leaves the body unstarted, and closing an unstarted generator runs none of its code).
    """

    def __init__(
        self,
        content: ContentStream,
        *,
        stall_s: float | None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.stall_s = stall_s
        self.stalled = False
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            if self.stall_s is None:  # no guard here: nothing per frame
                await super().stream_response(send)
            else:
                await self._guarded(send, self.stall_s)
        finally:
            await self._close_body()

    async def _guarded(self, send: Send, stall_s: float) -> None:
        watch = SendWatch(send)
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch, watch, stall_s, group.cancel_scope)
            try:
                await super().stream_response(watch)
            finally:
                group.cancel_scope.cancel()

    async def _close_body(self) -> None:
        """Close the body now, however the response ended: Starlette leaves it suspended
        at its `yield` when a write fails or is cancelled (a client gone, the stall above).
        Closing it runs the generation's cleanup (the engine request is aborted, the usage
        settled); shielded, since the cancel scope that ended the response would cut
        every await of that cleanup. A body that ran to its end closes at no cost."""
        aclose = getattr(self.body_iterator, "aclose", None)
        with anyio.CancelScope(shield=True):
            try:
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_close is not None:
                    await self.on_close()

    async def _watch(self, watch: SendWatch, stall_s: float, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(stall_s / 4)
            if watch.stalled(stall_s):
                self.stalled = True
                log.warning("client stopped reading its stream for %.0f s; aborting", stall_s)
                scope.cancel()
                return


class StalledClientGuard:
    """ASGI middleware on the server's own `send`: a write blocked for `stall_s` makes
    `receive` report the client as disconnected (for good)."""

    def __init__(self, app: ASGIApp, *, stall_s: float) -> None:
        self.app = app
        self.stall_s = stall_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = SendWatch(send)
        gone = False

        async def watched_receive() -> Message:
            nonlocal gone
            if gone:
                return {"type": "http.disconnect"}
            pending = asyncio.ensure_future(receive())
            try:
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=self.stall_s / 4)
                    if done:
                        return pending.result()
                    if watch.stalled(self.stall_s):
                        gone = True
                        log.warning(
                            "client stopped reading for %.0f s; ending its request", self.stall_s
                        )
                        return {"type": "http.disconnect"}
            finally:
                if not pending.done():
                    pending.cancel()

        await self.app(scope, watched_receive, watch)
