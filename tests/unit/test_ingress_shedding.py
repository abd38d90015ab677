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
from serve.ingress import (
    MAXCONN_ENV,
    SHED_RULE,
    TENANT_CAP_VAR,
    TENANT_MAXCONN_ENV,
    TENANT_TRACK,
)
from serve.settings import Settings
from tests.ports import free_port
from tests.unit.test_ingress import fake_haproxy, ray_haproxy_config
from tests.unit.test_ingress_errors import Ingress, assert_json_error, haproxy, read_request


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
        line, _ = read_request(self.rfile)
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


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def hold(
    pool: ThreadPoolExecutor, ingress: Ingress, n: int, token: str | None = None
) -> list[Future[httpx.Response]]:
    return [
        pool.submit(
            httpx.post,
            f"{ingress.url}/hold/{i}",
            json={"prompt": "hi"},
            headers=bearer(token),
            timeout=30,
        )
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


TENANT_MESSAGE = "Rate limited: too many requests in flight for this tenant, please try again."


def test_one_tenant_over_its_share_gets_haproxy_429_while_others_pass(tmp_path: Path) -> None:
    with (
        holding_replica() as replica,
        haproxy(tmp_path, {"/": ("live", replica.server_address[1])}, tenant_maxconn=2) as ing,
        ThreadPoolExecutor(8) as pool,
    ):
        held = hold(pool, ing, 2, token="tenant-a")
        replica.wait_held(2)
        r = httpx.post(f"{ing.url}/v1/chat/completions", json={}, headers=bearer("tenant-a"))
        assert assert_json_error(r, 429) == TENANT_MESSAGE
        assert r.headers["retry-after"] == "1"
        assert not any(f.done() for f in held) and replica.held == 2
        # Another tenant's requests, and one without a token (the gateway's 401), still
        # reach the replica; so would "Bearer tenant-a" with another scheme's spelling.
        held += hold(pool, ing, 2, token="tenant-b") + hold(pool, ing, 1)
        replica.wait_held(5)
        replica.release.set()
        assert [f.result().status_code for f in held] == [200] * 5
        # A tracker ends with its request: nothing is left counted, also after many
        # requests on one kept-alive client connection.
        with httpx.Client(headers=bearer("tenant-a"), timeout=10) as client:
            assert [client.post(f"{ing.url}/after").status_code for _ in range(6)] == [200] * 6
        replica.release.clear()
        held = hold(pool, ing, 2, token="tenant-a")
        replica.wait_held(7)
        replica.release.set()
        assert [f.result().status_code for f in held] == [200, 200]


def test_a_tenants_share_is_per_replica_up(tmp_path: Path) -> None:
    with (
        holding_replica() as one,
        holding_replica() as two,
        haproxy(
            tmp_path,
            {"/": ("live", (one.server_address[1], two.server_address[1]))},
            tenant_maxconn=1,
        ) as ing,
        ThreadPoolExecutor(4) as pool,
    ):
        held = hold(pool, ing, 2, token="tenant-a")
        one.wait_held(1)
        two.wait_held(1)
        r = httpx.post(f"{ing.url}/v1/chat/completions", json={}, headers=bearer("tenant-a"))
        assert assert_json_error(r, 429) == TENANT_MESSAGE
        one.release.set()
        two.release.set()
        assert [f.result().status_code for f in held] == [200, 200]


def test_the_limit_is_what_a_replica_can_run_or_queue_plus_the_headroom() -> None:
    settings = Settings(max_inflight_per_replica=8, queue_max_total=20, ingress_headroom=4)
    assert settings.engine_slots == 8
    assert settings.ingress_server_maxconn == 32
    # One tenant: the slots less the reserved ones (8 // 16 = 0) + its queue (64).
    assert settings.ingress_tenant_maxconn == 8 + 64 + 4
    reserved = Settings(max_inflight_per_replica=32, queue_max_per_tenant=10, ingress_headroom=0)
    assert reserved.reserved_slots == 2 and reserved.ingress_tenant_maxconn == 32 - 2 + 10
    assert Settings(ingress_shedding=False).ingress_server_maxconn is None
    assert Settings(ingress_shedding=False).ingress_tenant_maxconn is None
    with pytest.raises(ValueError, match="at least one request"):
        from serve.ingress import shed_script

        shed_script(0)


@pytest.mark.parametrize("tenant", [False, True], ids=["per-replica", "per-tenant"])
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
def test_up_writes_the_settings_limits_which_the_environment_overrides(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tenant: bool,
    shedding: bool,
    env: str | None,
    expect: int | str | None,
) -> None:
    """`batchserve up` writes the wrapper with `Settings.ingress_server_maxconn` and
    `ingress_tenant_maxconn`; the images' wrapper was written with the defaults, so the
    chart sets MAXCONN_ENV and TENANT_MAXCONN_ENV."""
    settings = Settings(cache_dir=tmp_path / "cache", ingress_shedding=shedding)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake_haproxy(tmp_path)))
    _use_haproxy_wrapper(settings)
    cfg = ray_haproxy_config(tmp_path, free_port(), {"/": ("app", free_port())})
    run_env = {k: v for k, v in os.environ.items() if k not in (MAXCONN_ENV, TENANT_MAXCONN_ENV)}
    if env is not None:
        run_env[TENANT_MAXCONN_ENV if tenant else MAXCONN_ENV] = env
    wrapper = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    subprocess.run([wrapper, "-f", str(cfg)], check=True, capture_output=True, env=run_env)
    lines = [line.strip() for line in cfg.read_text().splitlines()]
    default_server = next(line.split() for line in lines if line.startswith("default-server"))
    caps = [line for line in lines if TENANT_CAP_VAR in line and "set-var" in line]
    server_limit, tenant_limit = settings.ingress_server_maxconn, settings.ingress_tenant_maxconn
    if expect != "settings":
        server_limit, tenant_limit = (server_limit, expect) if tenant else (expect, tenant_limit)
    if server_limit is None:
        assert "maxconn" not in default_server and SHED_RULE not in lines
    else:
        assert default_server[-2:] == ["maxconn", str(server_limit)]
        assert lines.count(SHED_RULE) == 1
    if tenant_limit is None:
        assert not caps and TENANT_TRACK not in lines
    else:
        assert caps == [f"http-request set-var({TENANT_CAP_VAR}) nbsrv,mul({tenant_limit})"]
        assert lines.count(TENANT_TRACK) == 1
