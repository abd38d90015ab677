"""A gateway in its own process (`uvicorn tests.tenancy_app:create_app`, the fake engine),
for tests that kill it, restart it or run two of them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def start_gateway(
    work: Path,
    tenants: Path,
    port: int,
    env: Mapping[str, str] | None = None,
    *,
    last_words: bool = False,
) -> subprocess.Popen[bytes]:
    """Start it on `port` with its cache in `work/cache`; return once /healthz answers.
    `env` adds TENANCY_APP_* settings (see tests/tenancy_app.py); with `last_words` it is
    served as a replica serves it, with a keeper (tests/last_words_server.py)."""
    full_env = {
        **os.environ,
        "TENANCY_APP_DIR": str(work / "cache"),
        "TENANCY_APP_TENANTS": str(tenants),
        **(env or {}),
    }
    with (work / f"gateway-{port}.log").open("ab") as log:
        if last_words:
            command = [sys.executable, "-m", "tests.last_words_server", str(port)]
        else:
            command = [sys.executable, "-m", "uvicorn", "tests.tenancy_app:create_app",
                       "--factory", "--host", "127.0.0.1", "--port", str(port),
                       "--log-level", "warning"]  # fmt: skip
        proc = subprocess.Popen(
            command, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the gateway did not start (see {work}/gateway-{port}.log)")
        time.sleep(0.1)
