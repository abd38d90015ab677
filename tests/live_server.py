"""A gateway app on a real loopback socket (uvicorn in a thread), for tests where a
client must really read, stall or go away mid-stream."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

from serve.cluster import build_gateway
from serve.settings import Settings
from tests.fakes import FakeEngine


@contextmanager
def serving(app: ASGIApp, http: type[asyncio.Protocol] | str = "auto") -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (`http`: uvicorn's HTTP protocol); yields `host:port`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def live(settings: Settings, engine: FakeEngine) -> Iterator[str]:
    """The gateway on the fake engine, served for real; yields its base URL."""
    with serving(build_gateway(settings, engine)) as address:
        yield f"http://{address}"
