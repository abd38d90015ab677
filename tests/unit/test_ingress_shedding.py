"""Load shedding at the ingress (serve/ingress.py): HAProxy hands each replica at most
`Settings.ingress_server_maxconn` requests at once and answers the rest itself with the
JSON 429/3040 page, instead of passing a flood to replicas that could only refuse it, at
about ten times the CPU. A real HAProxy (the bundled one, through the wrapper, on the
config Ray itself renders) in front of a stand-in replica that holds requests."""

from __future__ import annotations

import os
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from serve.cli import _use_haproxy_wrapper
from serve.ingress import MAXCONN_ENV, SHED_RULE
from serve.settings import Settings
from tests.ports import free_port
from tests.unit.test_ingress import fake_haproxy, ray_haproxy_config
from tests.unit.test_ingress_errors import Ingress, assert_json_error, haproxy


class _Holding(socketserver.ThreadingTCPServer):
    """A replica answering 200 to each request (health checks too), except that requests
    under /hold wait for `release` first; `held` counts those waiting."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HoldingHandler)
        self.release = threading.Event()
        self.held = 0
        self.lock = threading.Lock()

    def wait_held(self, n: int, timeout_s: float = 10) -> None:
        for _ in range(int(timeout_s / 0.02)):
            with self.lock:
                if self.held >= n:
                    return
            time.sleep(0.02)
        raise AssertionError(f"{self.held} requests reached the replica, not {n}")


class _HoldingHandler(socketserver.StreamRequestHandler):
    server: _Holding

    def handle(self) -> None:
        line = self.rfile.readline()
        length = 0
        while (header := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.rfile.read(length)
        if b" /hold" in line:
            with self.server.lock:
                self.server.held += 1
            self.server.release.wait(30)
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
            b'Connection: close\r\n\r\n{"ok":true}'
        )


@contextmanager
def holding_replica() -> Iterator[_Holding]:
    replica = _Holding()
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    try:
        yield replica
    finally:
        replica.release.set()
        replica.shutdown()
        replica.server_close()


def hold(pool: ThreadPoolExecutor, ingress: Ingress, n: int) -> list[Future[httpx.Response]]:
    return [
        pool.submit(httpx.post, f"{ingress.url}/hold/{i}", json={"prompt": "hi"}, timeout=30)
        for i in range(n)
    ]


def test_a_full_replica_is_not_handed_more_haproxy_answers_429(tmp_path: Path) -> None:
    with (
        holding_replica() as replica,
        haproxy(tmp_path, {"/": ("live", replica.server_address[1])}, server_maxconn=2) as ing,
        ThreadPoolExecutor(4) as pool,
    ):
        held = hold(pool, ing, 2)
        replica.wait_held(2)
        # Refused at once, while both are still held: nothing was queued behind them.
        for path in ("/client/v4/accounts/a/ai/run/@cf/qwen/qwen1.5-1.8b-chat", "/v1/models"):
            r = httpx.post(f"{ing.url}{path}", json={"prompt": "hi"}, timeout=10)
            message = assert_json_error(r, 429)
            assert message == "Capacity temporarily exceeded, please try again."
            assert r.headers["retry-after-ms"] == "1000"
        assert not any(f.done() for f in held) and replica.held == 2
        # HAProxy's own health endpoint does not count against the replica.
        assert httpx.get(f"{ing.url}/-/healthz", timeout=10).status_code == 200
        replica.release.set()
        assert [f.result().status_code for f in held] == [200, 200]
        # A slot is free again: the next request reaches the replica.
        assert httpx.post(f"{ing.url}/after", json={}, timeout=10).status_code == 200


def test_without_a_limit_the_replica_is_handed_everything(tmp_path: Path) -> None:
    with (
        holding_replica() as replica,
        haproxy(tmp_path, {"/": ("live", replica.server_address[1])}) as ing,
        ThreadPoolExecutor(4) as pool,
    ):
        held = hold(pool, ing, 3)
        replica.wait_held(3)
        replica.release.set()
        assert [f.result().status_code for f in held] == [200, 200, 200]


def test_a_backend_with_no_replica_up_is_still_a_503(tmp_path: Path) -> None:
    """The shedding rule does not match a backend whose replicas are all down: the client
    gets HAProxy's 503 page (no replica), not a 429 that would say it is only busy."""
    with (
        holding_replica() as replica,
        haproxy(
            tmp_path,
            {"/": ("live", replica.server_address[1]), "/gone": ("gone", free_port())},
            server_maxconn=2,
        ) as ing,
    ):
        r = httpx.post(f"{ing.url}/gone/v1/chat/completions", json={}, timeout=10)
        assert_json_error(r, 503)


def test_the_limit_is_what_a_replica_can_run_or_queue_plus_the_headroom() -> None:
    settings = Settings(max_inflight_per_replica=8, queue_max_total=20, ingress_headroom=4)
    assert settings.engine_slots == 8
    assert settings.ingress_server_maxconn == 32
    assert Settings(ingress_shedding=False).ingress_server_maxconn is None
    with pytest.raises(ValueError, match="at least one request"):
        from serve.ingress import shed_script

        shed_script(0)


@pytest.mark.parametrize(
    ("shedding", "env", "expect"),
    [
        (True, None, "settings"),
        (True, "7", 7),
        (True, "0", None),
        (True, "many", None),
        (False, None, None),
        (False, "9", 9),
    ],
)
def test_up_writes_the_settings_limit_which_the_environment_overrides(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shedding: bool,
    env: str | None,
    expect: int | str | None,
) -> None:
    """`batchserve up` writes the wrapper with `Settings.ingress_server_maxconn`; the
    images' wrapper was written with the defaults, so the chart sets MAXCONN_ENV."""
    settings = Settings(cache_dir=tmp_path / "cache", ingress_shedding=shedding)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake_haproxy(tmp_path)))
    _use_haproxy_wrapper(settings)
    cfg = ray_haproxy_config(tmp_path, free_port(), {"/": ("app", free_port())})
    run_env = {k: v for k, v in os.environ.items() if k != MAXCONN_ENV}
    if env is not None:
        run_env[MAXCONN_ENV] = env
    wrapper = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    subprocess.run([wrapper, "-f", str(cfg)], check=True, capture_output=True, env=run_env)
    lines = [line.strip() for line in cfg.read_text().splitlines()]
    default_server = next(line.split() for line in lines if line.startswith("default-server"))
    limit = settings.ingress_server_maxconn if expect == "settings" else expect
    if limit is None:
        assert "maxconn" not in default_server and SHED_RULE not in lines
    else:
        assert default_server[-2:] == ["maxconn", str(limit)]
        assert lines.count(SHED_RULE) == 1
