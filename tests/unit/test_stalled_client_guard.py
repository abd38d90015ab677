"""`StalledClientGuard`, the middleware Serve's own HTTP servers run (`serve_http`): a
response write blocked for `stall_s` makes `receive` report the client gone, which is
how Serve learns to cancel a request whose app writes never block (user code on its own
event loop hands messages to the server through an unbounded queue)."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.types import Message, Receive, Scope, Send

from serve.gateway.stream_guard import StalledClientGuard

pytestmark = pytest.mark.timeout(20)

STALL_S = 0.4
SCOPE: Scope = {"type": "http", "method": "POST", "path": "/", "headers": []}


class ServeLike:
    """What Serve's direct ingress does with `receive`: read it for the whole request
    (the body, then until the disconnect), while the response is written on its own."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.received: list[Message] = []
        self.written = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def respond() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(self.frames):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                self.written += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        response = asyncio.ensure_future(respond())
        while not response.done():
            listen = asyncio.ensure_future(receive())
            await asyncio.wait({response, listen}, return_when=asyncio.FIRST_COMPLETED)
            if listen.done():
                self.received.append(listen.result())
                if listen.result()["type"] == "http.disconnect":
                    response.cancel()  # Serve cancels the request: the client is gone
                    break
            else:
                listen.cancel()
        await asyncio.gather(response, return_exceptions=True)


def client(messages: list[Message]) -> Receive:
    """The server's receive: the given messages, then nothing (a client still connected)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # blocks until cancelled
        raise AssertionError("unreachable")

    return receive


def sender(block_after: int | None, delay_s: float = 0.0) -> Send:
    """The server's send: each write takes `delay_s`; after `block_after` writes, one
    never completes (the client's window and the socket buffers are full)."""
    count = 0

    async def send(message: Message) -> None:
        nonlocal count
        count += 1
        await asyncio.sleep(delay_s)
        if block_after is not None and count > block_after:
            await asyncio.Event().wait()

    return send


BODY: Message = {"type": "http.request", "body": b"{}", "more_body": False}


def pending_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


async def test_blocked_write_reports_the_client_gone() -> None:
    app = ServeLike(frames=1000)
    before = pending_tasks()
    started = time.monotonic()
    await StalledClientGuard(app, stall_s=STALL_S)(SCOPE, client([BODY]), sender(block_after=5))
    took = time.monotonic() - started
    assert app.received == [BODY, {"type": "http.disconnect"}]
    assert app.written == 4  # start + 4 frames went out; the 5th body write never completed
    assert STALL_S <= took < STALL_S + 5, took  # checked every STALL_S / 4 (a loaded CI)
    await asyncio.sleep(0)  # let cancelled tasks finish
    assert pending_tasks() == before  # the server's pending `receive` was not left behind


async def test_gone_stays_gone() -> None:
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        write = asyncio.ensure_future(
            send({"type": "http.response.body", "body": b"x", "more_body": True})
        )
        seen.append(await receive())
        write.cancel()
        seen.append(await receive())  # no write pending any more: still gone, at once

    await StalledClientGuard(app, stall_s=STALL_S)(SCOPE, client([]), sender(block_after=1))
    assert seen == [{"type": "http.disconnect"}] * 2


async def test_a_slow_reader_that_keeps_reading_is_served() -> None:
    app = ServeLike(frames=8)  # each write takes a fifth of the stall limit: slow, not stalled
    await StalledClientGuard(app, stall_s=STALL_S)(
        SCOPE, client([BODY]), sender(block_after=None, delay_s=STALL_S / 5)
    )
    assert app.written == 8 and app.received == [BODY]


async def test_a_client_that_closes_is_passed_on() -> None:
    app = ServeLike(frames=1000)
    gone: Message = {"type": "http.disconnect"}
    await StalledClientGuard(app, stall_s=60)(SCOPE, client([BODY, gone]), sender(block_after=3))
    assert app.received == [BODY, gone]


async def test_other_scopes_are_untouched() -> None:
    calls: list[Receive] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(receive)

    receive = client([])
    await StalledClientGuard(app, stall_s=STALL_S)({"type": "lifespan"}, receive, sender(None))
    assert calls == [receive]
