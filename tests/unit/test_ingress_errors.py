"""HAProxy's own error responses as JSON envelopes of both dialects (serve/ingress_errors.py):
the files themselves, then a real HAProxy (the bundled one, run by the wrapper over the
config Ray itself renders) in front of a replica that dies under a request and of one
that is gone. No Ray cluster: a few seconds."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cloudflare
import httpx
import jsonschema
import openai
import psutil
import pytest

from serve.gateway.openapi_doc import OPENAI_ERROR, WORKERS_AI_ERROR
from serve.ingress import real_haproxy_binary, soft_stop, write_haproxy_wrapper
from serve.ingress_errors import MAX_PAGE_BYTES, write_error_pages
from tests.ports import free_port
from tests.unit.test_ingress import STATUSES, ray_haproxy_config

# status -> (Workers AI code, OpenAI type, OpenAI code, Retry-After)
EXPECTED: dict[int, tuple[int, str, str, str | None]] = {
    400: (5006, "invalid_request_error", "5006", None),
    404: (7003, "invalid_request_error", "7003", None),
    403: (10000, "permission_error", "10000", None),
    408: (3007, "timeout_error", "3007", None),
    429: (3040, "rate_limit_error", "rate_limit_exceeded", "1"),
    500: (3008, "server_error", "3008", None),
    501: (5006, "invalid_request_error", "5006", None),
    502: (3008, "server_error", "3008", "1"),
    503: (3040, "server_error", "3040", "1"),
    504: (3007, "timeout_error", "3007", None),
}
WORKERS_AI_KEYS = {"result", "success", "errors", "messages"}
HTTP_REQUEST_TIMEOUT_S = 1


def assert_both_envelopes(body: Any, status: int) -> str:
    """`body` is the error envelope of both dialects for `status`: each dialect's keys
    validate against the schema `/openapi.json` documents for its errors (which allow no
    other key), and there is nothing else. Returns the message."""
    assert isinstance(body, dict) and set(body) == WORKERS_AI_KEYS | {"error"}, body
    jsonschema.validate({k: body[k] for k in WORKERS_AI_KEYS}, WORKERS_AI_ERROR)
    jsonschema.validate({"error": body["error"]}, OPENAI_ERROR)
    code, openai_type, openai_code, _ = EXPECTED[status]
    assert body["result"] is None and body["success"] is False and body["messages"] == []
    assert [e["code"] for e in body["errors"]] == [code]
    message = body["errors"][0]["message"]
    assert body["error"] == {
        "message": message,
        "type": openai_type,
        "param": None,
        "code": openai_code,
    }
    return str(message)


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.file


def parse_response(raw: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    """Parse `raw` as one HTTP/1.1 response; it must hold nothing after the body."""
    sock = _Raw(raw)
    response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    response.begin()
    length = int(response.getheader("Content-Length") or -1)
    body = response.read()
    assert len(body) == length and raw.endswith(b"\r\n\r\n" + body), "bytes after the body"
    return response, body


def test_each_page_is_one_http_response_with_both_envelopes(tmp_path: Path) -> None:
    pages = write_error_pages(tmp_path, http_request_timeout_s=7)
    assert sorted(pages) == list(STATUSES)
    for status, path in pages.items():
        raw = path.read_bytes()
        assert len(raw) < MAX_PAGE_BYTES and raw.startswith(f"HTTP/1.1 {status} ".encode())
        response, body = parse_response(raw)
        assert response.status == status and response.version == 11
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Content-Length") == str(len(body))
        # The gateway's security headers, as on every response of the gateway.
        assert response.getheader("Cache-Control") == "no-store"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("X-Frame-Options") == "DENY"
        assert response.getheader("Referrer-Policy") == "no-referrer"
        assert response.getheader("Connection") == "close"
        assert response.getheader("Retry-After") == EXPECTED[status][3]
        message = assert_both_envelopes(json.loads(body), status)
        assert "HAProxy" not in message and message.strip() == message
    _, body = parse_response(pages[408].read_bytes())
    assert "longer than 7 s" in json.loads(body)["errors"][0]["message"]
    _, body = parse_response(pages[502].read_bytes())
    assert json.loads(body)["errors"][0]["message"] == (
        "AiError: The replica serving this request went away, please retry"
    )


# -- a real HAProxy -------------------------------------------------------------------------


NOT_FOUND_TEXT = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 14\r\nConnection: close\r\n\r\nPath not found"
)
NOT_FOUND_JSON = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
    b'content-length: 13\r\nConnection: close\r\n\r\n{"errors":[]}'
)


class _Replica(socketserver.BaseRequestHandler):
    """Answers 200 to anything (health checks included), except a request whose path
    contains /dies: it reads it, waits a little (the request is in flight) and closes the
    connection without a response, as a killed process does (with a reset when the path
    also contains /rst). Closes the connection after each answer, so that HAProxy opens a
    new one for each request, unless the path starts with /kept."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffered += chunk
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffered) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffered += chunk
            buffered = buffered[length:]
            target = head.split(b" ")[1]
            if b"/dies" in target:
                time.sleep(0.2)
                if b"/rst" in target:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if b"/serve-404" in target:  # a replica or proxy of Serve's with no app
                sock.sendall(NOT_FOUND_TEXT)
                return
            if b"/gateway-404" in target:  # the gateway's own 404 (a route it lacks)
                sock.sendall(NOT_FOUND_JSON)
                return
            kept = target.startswith(b"/kept")
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
                + (b"" if kept else b"Connection: close\r\n")
                + b'\r\n{"ok":true}'
            )
            if not kept:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass(frozen=True)
class Ingress:
    url: str
    port: int
    pid: int  # HAProxy's (the wrapper execs it)


@contextmanager
def haproxy(
    work: Path,
    apps: dict[str, tuple[str, int | tuple[int, ...]]],
    bind_host: str | None = None,
    server_maxconn: int | None = None,
    tenant_maxconn: int | None = None,
    http_request_timeout_s: int = HTTP_REQUEST_TIMEOUT_S,
    timeout_client_s: int | None = None,
    public_metrics: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[Ingress]:
    """The bundled HAProxy, started through the wrapper on Ray's own rendering of a config
    with these apps (path prefix -> (name, replica port or ports)), Serve's host
    127.0.0.1; the keywords as `write_haproxy_wrapper` takes them; `env`: added to the
    wrapper's environment."""
    port = free_port()
    cfg = ray_haproxy_config(work, port, apps, timeout_client_s=timeout_client_s)
    wrapper = write_haproxy_wrapper(
        work / "bin" / "haproxy",
        http_request_timeout_s,
        real_haproxy_binary(),
        bind_host=bind_host,
        server_maxconn=server_maxconn,
        tenant_maxconn=tenant_maxconn,
        public_metrics=public_metrics,
    )
    log = (work / "haproxy.log").open("wb")
    proc = subprocess.Popen(
        [str(wrapper), "-f", str(cfg), "-db"],
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (work / "haproxy.log").read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=1)
                if r.status_code == 200 or not apps:  # with no apps it never passes
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "HAProxy did not come up"
            time.sleep(0.05)
        yield Ingress(f"http://127.0.0.1:{port}", port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    """Three apps: `/` and `/kept` on the same live replica (two backends, so two pools of
    idle connections), `/gone` on a port nobody listens on."""
    replica = _Server(("127.0.0.1", 0), _Replica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    apps = {
        "/": ("live", replica.server_address[1]),
        "/kept": ("kept", replica.server_address[1]),
        "/gone": ("gone", free_port()),
    }
    try:
        with haproxy(tmp_path_factory.mktemp("haproxy"), apps) as running:
            yield running
    finally:
        replica.shutdown()
        replica.server_close()


def assert_json_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get("retry-after") == EXPECTED[status][3]
    return assert_both_envelopes(r.json(), status)


@pytest.mark.parametrize("how", ["dies", "dies/rst"])
def test_a_replica_dying_under_a_request_is_a_json_502(ingress: Ingress, how: str) -> None:
    with httpx.Client(base_url=ingress.url, timeout=10) as http:
        assert http.get("/ok").status_code == 200  # the replica is up (and now it dies)
    with httpx.Client(base_url=ingress.url, timeout=10) as http:
        r = http.post(f"/client/v4/accounts/a/ai/run/@cf/x/{how}", json={"prompt": "hi"})
    message = assert_json_error(r, 502)
    assert message == "AiError: The replica serving this request went away, please retry"


def test_no_replica_to_connect_to_is_a_json_503(ingress: Ingress) -> None:
    started = time.monotonic()
    r = httpx.post(f"{ingress.url}/gone/v1/chat/completions", json={}, timeout=10)
    assert_json_error(r, 503)
    assert time.monotonic() - started < 5  # at most HAProxy's 3 retries, 1 s apart


def test_no_application_deployed_is_a_json_503(tmp_path: Path) -> None:
    """Starting up, or `batchserve up` draining before it stops (its application deleted):
    Ray's config then sends every path to a backend that answered `text/plain` 404."""
    with haproxy(tmp_path, {}) as bare:
        for path in ("/client/v4/accounts/a/ai/run/@cf/qwen/qwen1.5-1.8b-chat", "/v1/models"):
            r = httpx.post(bare.url + path, json={"prompt": "hi"}, timeout=10)
            message = assert_json_error(r, 503)
            assert message == "AiError: No replica is available to serve this request, please retry"
        routes = httpx.get(bare.url + "/-/routes", timeout=10)  # Ray's own rule, untouched
        assert routes.headers["content-type"] != "application/json", routes.text


def test_serves_text_404_is_the_503_page_but_the_gateways_404_passes(ingress: Ingress) -> None:
    """A replica whose application was deleted, or Serve's fallback proxy, answers a
    `text/plain` 404 "Path ... not found"; the gateway's own 404 is JSON and passes."""
    r = httpx.post(f"{ingress.url}/serve-404", json={}, timeout=10)
    assert_json_error(r, 503)
    r = httpx.post(f"{ingress.url}/gateway-404", json={}, timeout=10)
    assert r.status_code == 404 and r.json() == {"errors": []}


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    return raw, time.monotonic() - started


def test_a_body_that_does_not_arrive_in_time_is_a_json_408(ingress: Ingress) -> None:
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 64\r\n\r\n{"  # then nothing
        )
        raw, waited = read_until_closed(sock)
    response, body = parse_response(raw)
    assert response.status == 408 and response.getheader("Content-Type") == "application/json"
    message = assert_both_envelopes(json.loads(body), 408)
    assert message == "AiError: Request timeout: the request took longer than 1 s to arrive"
    assert HTTP_REQUEST_TIMEOUT_S - 0.1 < waited < HTTP_REQUEST_TIMEOUT_S + 2


def test_errors_of_haproxys_http1_layer_keep_its_own_pages(ingress: Ingress) -> None:
    """Not what we want, but what HAProxy 2.8 does: before a request's headers are
    complete, its HTTP/1 layer answers by itself with built-in pages and reads no
    errorfile: a request it cannot parse (400) and headers that do not arrive within
    `timeout http-request` (408, slowloris). Neither comes from a client of either dialect
    that speaks HTTP in time. If this starts failing, HAProxy uses our pages there too."""
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw, _ = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 400 ") and b"Content-Type: text/html" in raw, raw
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # then nothing
        raw, waited = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 408 ") and b"Content-Type: text/html" in raw, raw
    assert waited < HTTP_REQUEST_TIMEOUT_S + 2


def test_the_official_sdks_read_the_502(ingress: Ingress) -> None:
    with (
        openai.OpenAI(base_url=f"{ingress.url}/dies/v1", api_key="k", max_retries=0) as oai,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert (caught.value.type, caught.value.code) == ("server_error", "3008")
    with (
        cloudflare.Cloudflare(
            api_token="t", base_url=f"{ingress.url}/dies/client/v4", max_retries=0
        ) as cf,
        pytest.raises(cloudflare.InternalServerError) as cf_caught,
    ):
        cf.ai.run("@cf/x/y", account_id="a", prompt="hi")
    assert cf_caught.value.status_code == 502
    assert [(e.code, e.message) for e in cf_caught.value.errors] == [
        (3008, "AiError: The replica serving this request went away, please retry")
    ]


def test_a_new_client_connection_gets_the_502_though_an_idle_one_waits(
    ingress: Ingress,
) -> None:
    """When the replica closes, without a response, a connection HAProxy had kept idle and
    reused for the request, HAProxy 2.8 closes the client's connection without any
    response (the idle-connection race of RFC 9112 9.3.1: the client is to retry); no
    error page changes that. Ray renders `http-reuse always`, so any request could meet it;
    the wrapper makes it `safe`: a client's first request gets a replica connection of its
    own, hence the JSON 502. Only a later request on a kept-alive client connection may
    reuse one and meet the bare close, which HTTP requires such a client to expect (the
    official SDKs retry it, `max_retries`)."""
    with httpx.Client(base_url=ingress.url, timeout=10) as http:
        assert http.get("/kept/ok").status_code == 200  # leaves an idle replica connection
    with httpx.Client(base_url=ingress.url, timeout=10) as http:  # a new client connection
        r = http.post("/kept/client/v4/accounts/a/ai/run/@cf/x/dies", json={"prompt": "hi"})
        assert_json_error(r, 502)  # with `http-reuse always`: httpx.RemoteProtocolError
    with httpx.Client(base_url=ingress.url, timeout=10) as http:
        assert http.get("/kept/ok").status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # the same client connection, reused
            http.post("/kept/client/v4/accounts/a/ai/run/@cf/x/dies", json={"prompt": "hi"})


def test_soft_stop_answers_what_haproxy_holds_and_refuses_new_connections(
    tmp_path: Path,
) -> None:
    """`batchserve up` soft-stops HAProxy after its replicas drained, before Serve's
    shutdown SIGKILLs it: a request HAProxy holds is answered (`Connection: close`), a
    kept-alive client connection gets its next answer and is closed, and a new connection
    is refused, never left without a response."""
    replica = _Server(("127.0.0.1", 0), _Replica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    try:
        with (
            # The held request's body is finished ~1 s later (more on a loaded machine).
            haproxy(
                tmp_path, {"/": ("live", replica.server_address[1])}, http_request_timeout_s=10
            ) as ing,
            httpx.Client(base_url=ing.url, timeout=5) as kept,
            socket.create_connection(("127.0.0.1", ing.port), timeout=5) as held,
        ):
            assert kept.get("/kept/a").status_code == 200  # now an idle kept-alive connection
            # A request HAProxy holds: half its body sent.
            held.sendall(b"POST /kept/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
            time.sleep(0.2)
            alive: list[psutil.Process] = []
            # The test process itself is among the candidates: only HAProxy is signalled.
            stopper = threading.Thread(
                target=lambda: alive.extend(
                    soft_stop([psutil.Process(), psutil.Process(ing.pid)], timeout_s=10)
                )
            )
            stopper.start()
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{ing.url}/kept/new", timeout=2)
            r = kept.get("/kept/b")
            assert (r.status_code, r.headers["connection"]) == (200, "close")
            held.sendall(b"67890")
            raw, _ = read_until_closed(held)
            response, body = parse_response(raw)
            assert (response.status, response.getheader("connection")) == (200, "close")
            assert body == b'{"ok":true}'
            stopper.join(10)
            assert not stopper.is_alive() and alive == []
            assert not psutil.pid_exists(ing.pid) or psutil.Process(ing.pid).status() == (
                psutil.STATUS_ZOMBIE
            )
    finally:
        replica.shutdown()
        replica.server_close()


def _non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine outside 127/8, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


@pytest.mark.parametrize("bind_host", [None, "127.0.0.1"])
def test_stats_and_metrics_ports_listen_on_the_serve_host_only(
    tmp_path: Path, bind_host: str | None
) -> None:
    """HAProxy's stats page and Prometheus exporter have no authentication: with Serve
    on 127.0.0.1 (`batchserve up`'s default) they listen on loopback only. Without a bind
    host (the images, whose Serve host is 0.0.0.0) they keep Ray's every-interface binds."""
    with haproxy(tmp_path, {}, bind_host=bind_host) as ing:
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process(ing.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert ("127.0.0.1", ing.port) in listening
        side = {(ip, port) for ip, port in listening if port != ing.port}
        assert len({port for _, port in side}) == 2, listening  # stats page, exporter
        if bind_host is None:  # Ray's own binds: every interface
            assert {ip for ip, _ in side} <= {"0.0.0.0", "::"}, side
            return
        assert {ip for ip, _ in side} == {"127.0.0.1"}, side
        # Both still answer on loopback ...
        stats_port, metrics_port = (
            int(line.split(":")[-1])
            for section in ("listen stats", "frontend prometheus")
            for line in _section(tmp_path / "haproxy.cfg", section)
            if line.split()[:1] == ["bind"]
        )
        assert httpx.get(f"http://127.0.0.1:{stats_port}/stats", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert metrics.status_code == 200 and "haproxy_" in metrics.text
        # ... and nowhere else.
        other = _non_loopback_ipv4()
        if other is not None:
            for port in (stats_port, metrics_port):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((other, port), timeout=5).close()


def _section(cfg: Path, name: str) -> list[str]:
    lines = cfg.read_text().splitlines()
    start = lines.index(name) + 1
    end = next(
        (i for i in range(start, len(lines)) if lines[i] and not lines[i][0].isspace()),
        len(lines),
    )
    return lines[start:end]


class _Waiting(socketserver.ThreadingTCPServer):
    """A replica that reads a request and then waits (never answering) until its
    connection ends; `ended` gets (body bytes, whether the end came within 2 s)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), handler or _WaitingHandler)
        self.ended: list[tuple[int, bool]] = []
        self.cut_after_s = 0.0  # _Pacing: when its write failed


def read_request(rfile: BinaryIO) -> tuple[bytes, int]:
    """Read one HTTP/1.1 request (Content-Length bodies only): its request line and its
    body's length."""
    line = rfile.readline()
    length = 0
    while (header := rfile.readline()) not in (b"\r\n", b""):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    rfile.read(length)
    return line, length


class _WaitingHandler(socketserver.StreamRequestHandler):
    server: _Waiting

    def handle(self) -> None:
        line, length = read_request(self.rfile)
        if b"/-/healthz" in line:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        self.connection.settimeout(2)
        try:
            ended = self.connection.recv(1) == b""
        except ConnectionResetError:
            ended = True
        except TimeoutError:
            ended = False
        self.server.ended.append((length, ended))


@pytest.mark.parametrize("padding", [100, 30_000, 35_000, 40_000, 45_000, 100_000])
def test_a_client_that_leaves_before_its_answer_ends_the_replicas_connection(
    tmp_path: Path, padding: int
) -> None:
    """A replica sees its client leave (Serve then cancels the request and the engine
    request is aborted) only if HAProxy ends the replica's connection when the client's
    ends. With Ray's `option splice-request` it did not for request bodies of about
    30.5-46.5 KB (35, 40 and 45 KB here fail with it); the wrapper removes that option
    (RELIABILITY.md, "A client that leaves before its answer")."""
    replica = _Waiting()
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    try:
        with haproxy(tmp_path, {"/": ("live", replica.server_address[1])}) as ing:
            body = json.dumps({"prompt": "hi", "padding": " " * padding}).encode()
            client = socket.create_connection(("127.0.0.1", ing.port), timeout=10)
            client.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.3)  # the replica has the request
            client.close()
            deadline = time.monotonic() + 5
            while not replica.ended:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert replica.ended == [(len(body), True)]
    finally:
        replica.shutdown()
        replica.server_close()


class _Pacing(socketserver.StreamRequestHandler):
    """A replica for `timeout client`: /silent answers after SILENT_S of silence, /paced
    writes a chunk every PACE_S, anything else writes until a write fails (and records
    when, from the answer's start, and how much it wrote)."""

    server: _Waiting

    def handle(self) -> None:
        line, _ = read_request(self.rfile)
        if b"/-/healthz" in line:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if b"/silent" in line:
            time.sleep(SILENT_S)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            return
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        if b"/paced" in line:
            for _ in range(3):
                time.sleep(PACE_S)
                self.wfile.write(b"2\r\n:\n\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        started, written = time.monotonic(), 0
        try:
            while written < 200_000_000:
                self.wfile.write(chunk)
                written += len(chunk)
        except OSError:
            self.server.ended.append((written, time.monotonic() - started < 60))
            self.server.cut_after_s = time.monotonic() - started


TIMEOUT_CLIENT_S = 2
SILENT_S = TIMEOUT_CLIENT_S * 2
PACE_S = TIMEOUT_CLIENT_S * 1.5


def test_timeout_client_ends_only_a_client_that_stopped_taking_bytes(tmp_path: Path) -> None:
    """`batchserve up`, the images and the chart set Ray's RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S
    to `stream_stall_s` (serve/ingress.py). HAProxy must not apply it while a client waits
    for a replica (a silent prefill, a stream's gaps between heartbeats), only while it
    waits for the client: a client that stopped reading is cut, and its replica's
    connection with it (Serve then cancels the request)."""
    replica = _Waiting(_Pacing)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    try:
        apps = {"/": ("live", replica.server_address[1])}
        with haproxy(tmp_path, apps, timeout_client_s=TIMEOUT_CLIENT_S) as ing:
            with httpx.Client(base_url=ing.url, timeout=30) as http:
                assert http.get("/silent").text == "ok"  # 2x the timeout without a byte
                assert http.get("/paced").text == ":\n" * 3  # gaps of 1.5x the timeout
            sock = socket.create_connection(("127.0.0.1", ing.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")  # then never reads again
            deadline = time.monotonic() + 30
            while not replica.ended:
                assert time.monotonic() < deadline, "the replica's connection was never ended"
                time.sleep(0.05)
            sock.close()
            ((written, _),) = replica.ended
            # What the buffers took at full speed, then TIMEOUT_CLIENT_S without progress.
            assert TIMEOUT_CLIENT_S <= replica.cut_after_s < TIMEOUT_CLIENT_S + 10
            assert written < 100_000_000
    finally:
        replica.shutdown()
        replica.server_close()


# -- /metrics and /healthz on the public port -----------------------------------------------


class _Replica404:
    """What a replica's own HTTP server runs (Serve's direct ingress, uvicorn): Serve's
    `/-/healthz` (what HAProxy checks), else the real gateway app, on the fake engine. It
    records the path (decoded, as uvicorn hands it to Starlette) of each request."""

    def __init__(self) -> None:
        from serve.cluster import build_gateway
        from tests.fakes import FakeEngine
        from tests.gateway.conftest import gateway_settings

        self.gateway = build_gateway(gateway_settings(), FakeEngine())
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/-/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"success"})
            return
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.gateway(scope, receive, send)


@contextmanager
def replica_app() -> Iterator[tuple[_Replica404, int]]:
    from tests.live_server import serving

    app = _Replica404()
    with serving(app) as address:  # type: ignore[arg-type]
        yield app, int(address.rsplit(":", 1)[1])


def raw_get(port: int, target: bytes, method: bytes = b"GET") -> tuple[int, bytes, str]:
    """Send one request with exactly this target (no client normalises it); the status,
    body and Content-Type of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw, _ = read_until_closed(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    ctype = next(
        (
            v.strip()
            for n, _, v in (h.partition(":") for h in lines[1:])
            if n.lower() == "content-type"
        ),
        "",
    )
    return int(lines[0].split()[1]), body, ctype


# Each one reaches the replica's `/metrics` route, or a path below it, or one a client or
# proxy might normalise into it: none may reach a replica through the public port.
METRICS_TARGETS = [
    b"/metrics",
    b"/metrics?format=prometheus",
    b"/metrics/",
    b"/metrics/x",
    b"//metrics",
    b"///metrics?x",
    b"/METRICS",
    b"/Metrics",
    b"/%6detrics",
    b"/%6D%65trics",
    b"/%2fmetrics",
    b"/metrics%2F",
    b"/metrics%3Fx",
    b"/metrics;x",
    b"http://x/metrics",
    b"http://x//%6Detrics?y",
]


def test_metrics_are_not_served_through_the_public_port(tmp_path: Path) -> None:
    """By default (`public_metrics` false) HAProxy answers every path a replica would read
    as its `/metrics`, however spelt, with the gateway's 404/7003 for a route it does not
    have, without asking a replica; the replica's own port still serves them to
    Prometheus, and the API's other paths pass."""
    with replica_app() as (app, port), haproxy(tmp_path, {"/": ("live", port)}) as ing:
        direct = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert direct.status_code == 200 and "batchserve_" in direct.text  # Prometheus's
        app.paths.clear()
        for method in (b"GET", b"HEAD", b"POST"):
            for target in METRICS_TARGETS:
                status, body, ctype = raw_get(ing.port, target, method)
                assert status == 404, (method, target, status, body)
                assert ctype == "application/json", (target, ctype)
                if method != b"HEAD":
                    message = assert_both_envelopes(json.loads(body), 404)
                    assert message == (
                        "Could not route to /metrics, perhaps your object identifier is invalid?"
                    )
                    assert b"batchserve_" not in body
        # A fragment (which uvicorn would drop) never gets past HAProxy's HTTP/1 layer.
        assert raw_get(ing.port, b"/metrics#x")[0] == 400
        assert not [p for p in app.paths if "metrics" in p.lower()], app.paths
        # Not a prefix match on anything else: a path that merely contains it passes.
        for path in ("/v1/models/metrics", "/x/metrics"):
            r = httpx.get(f"{ing.url}{path}", timeout=10)
            assert "Could not route to /metrics" not in r.text
            assert app.paths[-1] == path
        # The API itself is untouched.
        assert httpx.get(f"{ing.url}/v1/models", timeout=10).status_code in (200, 401)
        assert app.paths[-1] == "/v1/models"


@pytest.mark.parametrize(
    ("written", "env", "public"),
    [
        (True, {}, True),
        (False, {"BATCHSERVE_HAPROXY_PUBLIC_METRICS": "TRUE"}, True),
        (False, {"BATCHSERVE_HAPROXY_PUBLIC_METRICS": "1"}, True),
        (True, {"BATCHSERVE_HAPROXY_PUBLIC_METRICS": "false"}, False),
        (True, {"BATCHSERVE_HAPROXY_PUBLIC_METRICS": "nonsense"}, False),
        (False, {"BATCHSERVE_HAPROXY_PUBLIC_METRICS": ""}, False),
    ],
)
def test_public_metrics_opt_in(
    tmp_path: Path, written: bool, env: dict[str, str], public: bool
) -> None:
    """`public_metrics` true lets `/metrics` through to a replica, as before; the
    wrapper's environment (the chart's BATCHSERVE_HAPROXY_PUBLIC_METRICS) overrides what
    it was written with, and anything pydantic would not read as true keeps it private."""
    with (
        replica_app() as (app, port),
        haproxy(tmp_path, {"/": ("live", port)}, public_metrics=written, env=env) as ing,
    ):
        r = httpx.get(f"{ing.url}/metrics", timeout=10)
        if public:
            assert r.status_code == 200 and "batchserve_" in r.text
            assert app.paths == ["/metrics"]
        else:
            assert_json_error(r, 404)
            assert app.paths == []


def test_healthz_through_the_public_port_says_ok_and_no_more(tmp_path: Path) -> None:
    """The gateway's `/healthz` names the replica, its weights and its request counters:
    through the public port a 200 from it becomes `{"status":"ok"}` alone (what load
    balancers and `batchserve up` read is the status), on the replica's own port it keeps
    the details; Serve's `/-/healthz`, which HAProxy answers itself, is untouched."""
    with replica_app() as (app, port), haproxy(tmp_path, {"/": ("live", port)}) as ing:
        direct = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert {"replica", "weights", "requests_started"} <= set(direct)
        for target in (b"/healthz", b"/healthz?x=1", b"/%68ealthz"):
            status, body, ctype = raw_get(ing.port, target)
            assert (status, ctype) == (200, "application/json"), (target, body)
            assert json.loads(body) == {"status": "ok"}, target
        assert app.paths.count("/healthz") == 4  # a replica was asked each time
        r = httpx.get(f"{ing.url}/healthz", timeout=10)
        assert r.headers["cache-control"] == "no-store"
        serve = httpx.get(f"{ing.url}/-/healthz", timeout=10)
        assert (serve.status_code, serve.text) == (200, "success")


def test_healthz_with_no_replica_up_is_the_503_page(tmp_path: Path) -> None:
    """With no replica to ask (the application not deployed yet), the public `/healthz`
    stays the 503 page, not the minimal 200: `batchserve up` and load balancers see the
    stack is not ready."""
    with haproxy(tmp_path, {}) as ing:
        assert_json_error(httpx.get(f"{ing.url}/healthz", timeout=10), 503)
