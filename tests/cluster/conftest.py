"""The cluster tier: one real Ray Serve application (2 replicas, real vLLM on CPU)
started once through the CLI, on the tiny Qwen2 checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve.gateway.tenants import hash_token
from tests.ports import free_port_run

TOKEN = "cluster-tier-token"
ACCOUNT = "dev-account"
# Two more tenants (test_tenant_isolation.py): tenant -> (token, account).
TENANTS = {"a": ("cluster-token-tenant-a", "acct-a"), "b": ("cluster-token-tenant-b", "acct-b")}
MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
START_TIMEOUT_S = 420


@dataclass(frozen=True)
class Cluster:
    url: str
    replica_urls: tuple[str, ...]
    log: Path
    # The `batchserve up` process (Ray, Serve and the replicas run below it).
    pid: int
    # BATCHSERVE_CACHE_DIR: the replicas' shared usage ledger lives here.
    cache_dir: Path

    @property
    def run_url(self) -> str:
        return f"{self.url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _write_tenants(path: Path) -> None:
    entries = [("dev", TOKEN, ACCOUNT), *((t, tok, acct) for t, (tok, acct) in TENANTS.items())]
    path.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {"id": t, "accounts": [acct], "tokens": [{"sha256": hash_token(tok)}]}
                    for t, tok, acct in entries
                ]
            }
        )
    )


def haproxy_apart(hap: Path) -> dict[str, str]:
    """Env that keeps one cluster's HAProxy (files under `hap`, stats and metrics ports) and
    Serve's fallback proxy apart from another cluster's (the session cluster keeps running
    while a module starts its own). `hap` must be short: HAProxy's admin socket path must
    fit in 108 bytes."""
    side = free_port_run(4)  # bound late, when HAProxy and the fallback proxy start
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(side),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(side + 1),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(side + 2),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(side + 3),
    }


@contextmanager
def running_cluster(
    model_dir: Path,
    work: Path,
    *,
    replicas: int = 2,
    env: Mapping[str, str] | None = None,
    port_span: int | None = None,
) -> Iterator[Cluster]:
    """`batchserve up` on the tiny checkpoint, healthy on every replica; stopped with
    Ctrl-C on exit, failing if that leaves any of its processes running.

    `env` adds to (or overrides) the environment; `port_span` widens the range of
    direct-ingress ports Serve may give replicas (room for replacements).
    """
    span = port_span or replicas + 1
    # Serve's port, then the replicas' range after it (see tests.ports.QUIET_PORTS).
    port = free_port_run(span + 1)
    base = port + 1
    tenants_file = work / "tenants.yaml"
    _write_tenants(tenants_file)
    cache_dir = work / "cache"
    full_env = {
        **os.environ,
        "BATCHSERVE_DEV_TOKEN": TOKEN,
        "BATCHSERVE_CACHE_DIR": str(cache_dir),
        "BATCHSERVE_CPU_KV_CACHE_GIB": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Ray picks its metrics export port: several clusters may run at once.
        "BATCHSERVE_RAY_METRICS_EXPORT_PORT": "0",
        # Serve gives each replica its own HTTP port from this range; the tests read
        # every replica's engine state there directly.
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + span - 1),
        **(env or {}),
    }
    hap = Path(tempfile.mkdtemp(prefix="bs-hap-"))
    full_env = {**haproxy_apart(hap), **full_env}
    log = work / "batchserve-up.log"
    cmd = [sys.executable, "-m", "serve.cli", "up", "--profile", "cpu", "--port", str(port),
           "--model", str(model_dir), "--replicas", str(replicas),
           "--tenants-file", str(tenants_file)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    replica_urls = tuple(f"http://127.0.0.1:{base + i}" for i in range(replicas))
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not (_healthy(url) and all(_healthy(r) for r in replica_urls)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"batchserve up did not start; log:\n{log.read_text()[-5000:]}")
            time.sleep(2)
        yield Cluster(
            url=url, replica_urls=replica_urls, log=log, pid=proc.pid, cache_dir=cache_dir
        )
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()
        shutil.rmtree(hap, ignore_errors=True)
        leftovers = [f"{p.pid} {p.name()}" for p in alive]
        assert not leftovers, f"Ctrl-C left processes running: {leftovers}"


@pytest.fixture(scope="session")
def cluster(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # A small non-streaming cap, so the clamp test stays quick (test_clients.py).
    env = {"BATCHSERVE_NON_STREAM_MAX_TOKENS": "64"}
    with running_cluster(tiny_qwen2_dir, tmp_path_factory.mktemp("cluster"), env=env) as c:
        yield c


def replica_actors(cluster: Cluster) -> set[int]:
    """Every Serve replica actor process, ready or still starting."""
    found = set()
    for proc in psutil.Process(cluster.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "ServeReplica:" in " ".join(proc.cmdline()):
                found.add(proc.pid)
    return found
