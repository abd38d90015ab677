"""A client that stops reading its stream, end to end: real HAProxy, Serve and vLLM.

Serve runs the gateway on its own event loop by default and hands its messages to the
replica's HTTP server through an unbounded queue, so the gateway's writes never block and
its own stall guard cannot see a client that stopped reading. `StalledClientGuard` on
Serve's server (`serve.gateway.serve_http`) sees the blocked write and tells Serve the
client is gone, and Serve cancels the request as for a client that closed.

To block a write at all, the answer must outgrow the socket buffers between the replica
and the client, so the cluster serves a tiny Qwen2 with a 32k-token window and the client
asks for 8 long answers at once (the OpenAI dialect, about 170 bytes per token per
answer): about 40 MB if it were all made. Without the guard all of it is generated and
queued in the replica, and the engine request lives until the last token or until the
client goes (HAProxy's `timeout client` is an hour).

On the replica's own port the loopback buffers hold about 3 MB and the guard fires within
seconds. Through HAProxy the replica's guard alone would fire only once HAProxy's sockets
are full as well (minutes of the tiny model's generation, measured: RELIABILITY.md, "A
client that stops reading its stream"); HAProxy's own `timeout client`, set to
`stream_stall_s`, ends the client first.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster.conftest import MODEL, TOKEN, Cluster, running_cluster
from tests.cluster.test_overload_drain import _address, replicas_counter, report, unfinished
from tests.fixtures.tiny_qwen2 import build_tiny_qwen2

pytestmark = pytest.mark.cluster

STALL_S = 3.0
N, MAX_TOKENS = 8, 30_000
WHOLE = N * MAX_TOKENS  # tokens the stalled request would make if it ran to the end
# Generation at full speed (about 2-4k tokens/s for 8 answers here) fills the buffers
# in well under a minute; without the guard the whole answer takes minutes.
ENDED_WITHIN_S = 120.0


@pytest.fixture(scope="module")
def long_window(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model = build_tiny_qwen2(tmp_path_factory.mktemp("tiny-32k"), max_positions=32_768)
    env = {"BATCHSERVE_STREAM_STALL_S": str(STALL_S)}
    work = tmp_path_factory.mktemp("stalled-client")
    with running_cluster(model, work, replicas=1, env=env) as cluster:
        yield cluster


def stop_reading(url: str) -> socket.socket:
    """Send a long streaming request, read the response head, then never read again
    (a small receive buffer, so the client's side holds little)."""
    request = {"model": MODEL, "prompt": "Once upon a time", "n": N, "max_tokens": MAX_TOKENS}
    body = json.dumps({**request, "temperature": 0, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(_address(url))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1024)
        assert chunk, f"closed before the response head: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything left on the connection, until the server closed (or reset) it."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("front", ["replica", "haproxy"])
def test_a_client_that_stops_reading_is_cut_off_and_its_generation_aborted(
    long_window: Cluster, front: str
) -> None:
    """On the replica's port the replica's guard ends it (the write blocked STALL_S);
    through HAProxy, HAProxy's `timeout client` (STALL_S, set by `batchserve up`) does,
    once its socket to the client is full, before the replica's buffers are."""
    cluster = long_window
    made_before = replicas_counter(cluster, "vllm:generation_tokens")
    gone_before = replicas_counter(cluster, "batchserve_client_disconnects")
    started = time.monotonic()
    (replica,) = cluster.replica_urls
    sock = stop_reading(replica if front == "replica" else cluster.url)
    try:
        # Another client is served meanwhile.
        short = {"prompt": "hi", "max_tokens": 8}
        other = httpx.post(cluster.run_url, headers=cluster.auth, json=short, timeout=60)
        assert other.status_code == 200, other.text
        while unfinished(cluster) != 0:
            took = time.monotonic() - started
            assert took < ENDED_WITHIN_S, "the stalled client's engine request ran on"
            time.sleep(0.2)
        ended_s = time.monotonic() - started
        made = replicas_counter(cluster, "vllm:generation_tokens") - made_before
        # Aborted once the buffers were full and no byte had gone for STALL_S, not
        # generated to the end for nobody.
        assert made < WHOLE / 2, (made, WHOLE)
        deadline = time.monotonic() + 10
        while replicas_counter(cluster, "batchserve_client_disconnects") != gone_before + 1:
            assert time.monotonic() < deadline, "the replica did not count the client as gone"
            time.sleep(0.1)
        # The connection was dropped: what the buffers held, then the end, never [DONE].
        # (Through HAProxy that is up to 4 MB, which this client's small window takes
        # minutes to read.)
        rest = read_to_end(sock) if front == "replica" else b""
        assert b"[DONE]" not in rest
    finally:
        sock.close()
    report(
        f"stalled_client_{front}",
        ended_after_s=round(ended_s, 1),
        tokens_made=int(made),
        of_tokens=WHOLE,
        readable_after_stall_mb=round(len(rest) / 1e6, 1),
    )
