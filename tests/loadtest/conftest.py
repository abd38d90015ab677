"""A mock LLM server (both dialects) on its own event loop thread, per test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from loadtest.mock import MockConfig, MockServer

MockFactory = Callable[[MockConfig], str]


@pytest.fixture
def mock_server() -> Iterator[MockFactory]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[MockServer] = []

    def start(config: MockConfig) -> str:
        server = MockServer(config)
        servers.append(server)
        return asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)

    yield start
    for s in servers:
        asyncio.run_coroutine_threadsafe(s.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
