"""`GuardedStreamingResponse` closes its body when the response ends early: Starlette's
`StreamingResponse` leaves the body iterator suspended at its `yield` when the client's
disconnect cancels the response during a write (or the write fails), so the generation's
cleanup (engine abort, usage settlement) waited for the garbage collector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from serve.gateway.stream_guard import GuardedStreamingResponse

pytestmark = pytest.mark.timeout(20)

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "GET"}


class Body:
    """Frames for ever; notes whether its cleanup ran, and whether it could await there."""

    def __init__(self) -> None:
        self.closed = False
        self.cleaned_up = False

    async def frames(self) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield b"data: x\n\n"
        finally:
            self.closed = True
            await asyncio.sleep(0.01)  # a round trip in the cleanup (an engine abort)
            self.cleaned_up = True


@pytest.mark.parametrize("stall_s", [None, 30.0])
async def test_a_client_gone_during_a_write_closes_the_body_at_once(stall_s: float | None) -> None:
    body = Body()
    response = GuardedStreamingResponse(body.frames(), stall_s=stall_s)
    writing = asyncio.Event()

    async def receive() -> Message:
        await writing.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            writing.set()
            await asyncio.Event().wait()  # the write blocks until the response is cancelled

    await response(SCOPE, receive, send)
    assert body.closed and body.cleaned_up


async def test_a_failed_write_closes_the_body_at_once() -> None:
    """ASGI 2.4: a write to a gone client raises OSError (Starlette's ClientDisconnect)."""
    body = Body()
    response = GuardedStreamingResponse(body.frames(), stall_s=None)

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("connection reset")

    scope = {**SCOPE, "asgi": {"version": "3.0", "spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        await response(scope, receive, send)
    assert body.closed and body.cleaned_up
