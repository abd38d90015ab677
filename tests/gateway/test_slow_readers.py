"""A client that stops reading its stream (real uvicorn socket, raw TCP client): the
generation is held back by backpressure instead of buffered, other streams go on, and
past `stream_stall_s` the request is aborted and its engine request freed."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, MODEL, RUN_URL, TOKEN
from tests.live_server import live

pytestmark = pytest.mark.timeout(60)

STALL_S = 0.5
WORD = "w" * 2000  # one ~2 KB frame per token
WORDS = 10_000  # ~20 MB if it were all generated
FRAME_BYTES = len(WORD) + 20
# Kernel buffers on loopback: the client's receive buffer (set small below) and the
# server's send buffer (autotuned up to net.ipv4.tcp_wmem max, 4 MiB here), plus
# uvicorn's 64 KiB high-water mark. Beyond that nothing may be generated ahead.
MAX_AHEAD_BYTES = 6 * 1024 * 1024

PATHS = {
    "workers_ai": (RUN_URL, {"prompt": "hi", "stream": True, "max_tokens": WORDS}),
    "openai": (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": WORDS,
        },
    ),
}


@pytest.fixture
def big_engine() -> FakeEngine:
    return FakeEngine(reply=" ".join([WORD] * WORDS), context_window=100_000)


@pytest.fixture
def base(settings: Settings, big_engine: FakeEngine) -> Iterator[str]:
    changed = settings.model_copy(update={"stream_stall_s": STALL_S, "request_timeout_s": 120})
    with live(changed, big_engine) as url:
        yield url


def stop_reading_client(base: str, path: str, body: dict[str, object]) -> socket.socket:
    """Send a streaming request, read its first bytes, then never read again."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect((host, int(port)))
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    sock.sendall(head.encode() + raw)
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    return sock


def wait_for(check: object, timeout_s: float) -> float:
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("dialect", sorted(PATHS))
def test_stalled_reader_is_aborted_and_others_unaffected(
    base: str, big_engine: FakeEngine, dialect: str
) -> None:
    path, body = PATHS[dialect]
    sock = stop_reading_client(base, path, body)
    try:
        # The writer blocks once the buffers are full; the generation waits with it.
        wait_for(lambda: big_engine.produced > 100, 10)
        # Another stream on the same server is served in full meanwhile.
        with httpx.Client(base_url=base, timeout=10) as other:
            r = other.post(path, headers=AUTH, json={**body, "max_tokens": 3, "stream": False})
        assert r.status_code == 200, r.text
        # Past the stall limit the stalled request is aborted and its engine request freed.
        waited = wait_for(lambda: len(big_engine.aborted) == 1, STALL_S * 2 + 5)
        assert big_engine.running == set()
        assert big_engine.produced * FRAME_BYTES < MAX_AHEAD_BYTES, big_engine.produced
        assert len(big_engine.finished) == 1  # the other request
        # The connection is closed (no hung socket): drain what the kernel holds, then EOF.
        sock.settimeout(10)
        tail = b""
        while chunk := sock.recv(1 << 20):
            tail += chunk
        assert b"[DONE]" not in tail
        assert waited < STALL_S * 2 + 5
    finally:
        sock.close()


def test_a_slow_but_steady_reader_is_not_aborted(settings: Settings) -> None:
    """Reading slower than the engine writes is fine as long as frames keep being taken."""
    engine = FakeEngine(reply=" ".join(["x" * 50] * 40), context_window=100_000)
    changed = settings.model_copy(update={"stream_stall_s": STALL_S})
    with (
        live(changed, engine) as url,
        httpx.stream(
            "POST",
            url + RUN_URL,
            headers=AUTH,
            json={"prompt": "hi", "stream": True, "max_tokens": 40},
            timeout=10,
        ) as r,
    ):
        got = b""
        for chunk in r.iter_raw(256):
            got += chunk
            time.sleep(0.01)
    assert got.endswith(b"data: [DONE]\n\n")
    assert engine.aborted == [] and len(engine.finished) == 1
