"""The deadline for request headers on the gateway's own HTTP server (slowloris without
HAProxy in front): the real gateway on the fake engine, served by uvicorn with
`HeaderDeadlineProtocol`, and raw sockets that trickle, stay silent, or keep a connection
alive between requests."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from serve.cluster import build_gateway
from serve.gateway import header_deadline
from serve.gateway.header_deadline import HeaderDeadlineProtocol
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, RUN_URL, TOKEN
from tests.live_server import serving

DEADLINE_S = 1.0


@pytest.fixture
def address(
    settings: Settings, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, int]]:
    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout_s", DEADLINE_S)
    with serving(build_gateway(settings, engine), http=HeaderDeadlineProtocol) as hostport:
        host, port = hostport.split(":")
        yield host, int(port)


def _request(body: dict[str, object]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST {RUN_URL} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    ).encode() + raw


def _read_until_closed(sock: socket.socket, give_up_s: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes (and when, from now), or until
    `give_up_s` (then None)."""
    start, received = time.monotonic(), b""
    sock.settimeout(0.1)
    while time.monotonic() - start < give_up_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return received, time.monotonic() - start
        received += chunk
    return received, None


def _assert_408(received: bytes) -> None:
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"Connection: close" in head
    assert b"x-content-type-options: nosniff" in head  # the gateway's security headers
    envelope = json.loads(body)
    assert envelope["errors"][0]["code"] == 3007  # Workers AI
    assert envelope["error"]["type"] == "timeout_error"  # OpenAI
    assert "headers took longer than 1 s" in envelope["errors"][0]["message"]


def test_trickled_headers_get_408_at_the_deadline(address: tuple[str, int]) -> None:
    request = _request({"prompt": "hi"})
    with socket.create_connection(address, timeout=5) as sock:
        start = time.monotonic()
        received = b""
        for i in range(len(request)):  # a byte every 0.1 s: 20+ s for the whole request
            try:
                sock.sendall(request[i : i + 1])
            except OSError:
                break
            part, closed = _read_until_closed(sock, 0.1)
            received += part
            if closed is not None:
                break
        elapsed = time.monotonic() - start
    _assert_408(received)
    assert DEADLINE_S - 0.1 <= elapsed <= DEADLINE_S + 1.0, elapsed


def test_a_silent_connection_is_closed_at_the_deadline(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        received, closed_after = _read_until_closed(sock, 5)
    assert closed_after is not None and closed_after <= DEADLINE_S + 1.0, closed_after
    _assert_408(received)


def test_keep_alive_idle_then_a_trickled_second_request(address: tuple[str, int]) -> None:
    """Idle time between requests is the keep-alive timeout's, not the header deadline's;
    a second request that then trickles is cut like a first one."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(_request({"prompt": "hi"}))
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        time.sleep(DEADLINE_S * 2)  # idle, longer than the deadline (uvicorn keeps 5 s)
        sock.sendall(_request({"prompt": "again"}))
        second, _ = _read_until_closed(sock, 1.0)
        assert second.startswith(b"HTTP/1.1 200"), second[:200]
        sock.sendall(b"POST ")  # a third request that never completes its headers
        third, closed_after = _read_until_closed(sock, 5)
    assert closed_after is not None and closed_after <= DEADLINE_S + 1.0, closed_after
    _assert_408(third)


@pytest.mark.parametrize("trickle", [b"\r\n", b"x"], ids=["crlf", "unread-body"])
def test_bytes_after_a_response_that_start_no_request(
    address: tuple[str, int], trickle: bytes
) -> None:
    """CRLFs between requests, or the rest of a body the app never read (a huge
    Content-Length on a request answered at once), start no request and would hold the
    connection past the keep-alive timeout."""
    with socket.create_connection(address, timeout=5) as sock:
        length = 2 if trickle == b"\r\n" else 1_000_000_000
        sock.sendall(
            f"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        first, _ = _read_until_closed(sock, 0.5)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        start, closed_after, received = time.monotonic(), None, b""
        while time.monotonic() - start < 5 and closed_after is None:
            try:
                sock.sendall(trickle)
            except OSError:
                break
            part, closed = _read_until_closed(sock, 0.2)
            received += part
            closed_after = None if closed is None else time.monotonic() - start
    assert closed_after is not None and closed_after <= DEADLINE_S + 1.0, closed_after
    _assert_408(received)


def test_a_stream_longer_than_the_deadline_is_not_cut(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine(reply=" ".join(["w"] * 30), delay_s=0.1)  # 3 s of tokens
    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout_s", DEADLINE_S)
    with serving(build_gateway(settings, engine), http=HeaderDeadlineProtocol) as hostport:
        events, done = 0, False
        body = {"prompt": "hi", "stream": True, "max_tokens": 30}
        with httpx.stream("POST", f"http://{hostport}{RUN_URL}", headers=AUTH, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    assert "errors" not in json.loads(line[6:]), line
                    events += 1
    assert done and events >= 30  # the words, then the usage event


def test_install_makes_it_uvicorns_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a replica does before Serve builds its server (`http="auto"`)."""
    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout_s", 10.0)
    protocols = uvicorn.config.HTTP_PROTOCOLS
    for name in ("auto", "httptools"):
        monkeypatch.setitem(protocols, name, protocols[name])  # restored afterwards
    header_deadline.install(3)
    config = uvicorn.Config(app=lambda: None, factory=True, log_level="warning")
    config.load()
    assert config.http_protocol_class is HeaderDeadlineProtocol
    assert HeaderDeadlineProtocol.header_timeout_s == 3
