"""A request admitted (its ticket holds fair-queue slots and the tenant's streams) whose
completion never starts frees them when the request ends, not when the garbage collector
finds the ticket: the client gone before the response started, or before the stream
reached its first token. The garbage collector is off during each request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from serve.cluster import build_gateway
from serve.gateway.admission import Caller, Gate
from serve.gateway.ratelimit import InMemoryRateLimiter
from serve.gateway.tenants import Tenant
from tests.fakes import FakeEngine
from tests.gateway.conftest import MODEL, RUN_URL, asgi_post, gateway_settings

pytestmark = pytest.mark.timeout(20)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def no_garbage_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def request_whose_client_leaves(
    app: Any, path: str, body: dict[str, Any], *, spec: str, leave_after: int
) -> None:
    """One request whose client is gone after `leave_after` body frames of the response:
    with ASGI 2.4 the next write fails (as uvicorn's does for a closed socket), with 2.3
    the server reports `http.disconnect` (Starlette then cancels the response)."""
    sent = 0
    gone = asyncio.Event()

    async def send(message: Message) -> None:
        nonlocal sent
        if gone.is_set():
            raise OSError("client gone")
        if message["type"] == "http.response.body":
            sent += 1
        if sent >= leave_after:
            gone.set()
            if spec == "2.4":
                raise OSError("client gone")

    with contextlib.suppress(Exception):  # the server's business, not the test's
        await asgi_post(app, path, body, send, gone=gone, spec=spec)


@pytest.mark.parametrize(
    ("path", "body", "spec", "leave_after"),
    [
        # Gone before the response started (its first write fails): no frame was pulled.
        (RUN_URL, {"prompt": "hi", "stream": True}, "2.4", 0),
        (CHAT, {"model": MODEL, "stream": True, "messages": MESSAGES}, "2.4", 0),
        (CHAT, {"model": MODEL, "stream": True, "n": 2, "messages": MESSAGES}, "2.4", 0),
        # Gone at the chat stream's role chunks, sent before its choices start.
        (CHAT, {"model": MODEL, "stream": True, "messages": MESSAGES}, "2.4", 1),
        (CHAT, {"model": MODEL, "stream": True, "n": 2, "messages": MESSAGES}, "2.4", 1),
    ],
)
async def test_an_admitted_request_that_never_started_frees_its_slots_when_it_ends(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
    spec: str,
    leave_after: int,
) -> None:
    engine = FakeEngine(reply="word " * 20, delay_s=0.01)
    app = build_gateway(gateway_settings(cache_dir=str(tmp_path)), engine)
    gate: Gate = app.state.completions.gate
    limiter = gate.limiter
    assert isinstance(limiter, InMemoryRateLimiter)
    with no_garbage_collector(), caplog.at_level(logging.WARNING, "serve.gateway.admission"):
        await request_whose_client_leaves(app, path, body, spec=spec, leave_after=leave_after)
        # Right after the request ended, with no collection: the slots and streams are free.
        assert gate.queue.in_use == 0
        assert gate.queue.held_by("t1") == 0
        assert limiter.active_streams("t1") == 0
    assert engine.requests == []  # the completion really never started
    await asyncio.sleep(0.05)  # the settlement's round trips (usage record) in the background
    records = [r for r in caplog.records if "garbage collector" in r.getMessage()]
    assert records == []  # nothing was left to Ticket.__del__


async def test_a_ticket_left_to_the_garbage_collector_is_freed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`Ticket.__del__` stays as a last resort for a path that ends neither way: it frees
    the slots and says so, since the slots were held until a collection found it."""
    app = build_gateway(gateway_settings(cache_dir=str(tmp_path)), FakeEngine())
    gate: Gate = app.state.completions.gate
    caller = Caller.of(Tenant("t9", frozenset({"acct-9"})), None, MODEL)
    ticket = await gate.admit(
        caller, "req-lost", prompt_tokens=3, max_tokens=5, choices=1, headers_out={}
    )
    assert gate.queue.held_by("t9") == 1
    with caplog.at_level(logging.WARNING, "serve.gateway.admission"):
        del ticket
        gc.collect()
    assert gate.queue.held_by("t9") == 0
    assert any("garbage collector" in r.getMessage() for r in caplog.records)
    await asyncio.sleep(0.05)  # its settlement, in the background
