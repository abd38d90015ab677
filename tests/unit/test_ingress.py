"""The HAProxy wrapper that adds slow-client limits and JSON error pages to the config Ray
Serve generates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from serve.cli import _use_haproxy_wrapper
from serve.ingress import (
    CONFIG_MARKER,
    HEALTHZ_RULES,
    MAXCONN_ENV,
    METRICS_ACL,
    NOT_DEPLOYED_RULE,
    PUBLIC_METRICS_ENV,
    TENANT_MAXCONN_ENV,
    is_wrapper,
    metrics_rule,
    real_haproxy_binary,
    write_haproxy_wrapper,
)
from serve.ingress_errors import METRICS_PAGE, TENANT_PAGE, pages_dir
from serve.settings import Settings
from tests.ports import free_port

# The shape of Ray 2.60's rendered config (ray/serve/_private/haproxy_templates.py),
# with its errorfile lines: 502/503/504 as one text/plain 500.
RAY_CONFIG = """global
    maxconn 4096
defaults
    mode http
    option log-health-checks
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
    errorfile 502 {error_file}
    errorfile 503 {error_file}
    errorfile 504 {error_file}
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend default_backend
backend default_backend
    server s1 127.0.0.1:1
"""
STATUSES = (400, 403, 408, 429, 500, 501, 502, 503, 504)


def ray_haproxy_config(
    work: Path,
    frontend_port: int,
    servers: dict[str, tuple[str, int | tuple[int, ...]]],
    host: str = "127.0.0.1",
    timeout_client_s: int | None = None,
) -> Path:
    """The config Ray 2.60 itself renders (its own template and code, as its HAProxy
    manager does) for one HTTP app per `servers` entry: path prefix -> (name, port, or
    one port per replica), with Serve's http_options on `host`; `timeout_client_s` as
    RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S sets it (None: Ray's default)."""
    from ray.serve._private.haproxy import (
        BackendConfig,
        HAProxyApi,
        HAProxyConfig,
        ServerConfig,
    )
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        socket_path=str(work / "run" / "admin.sock"),
        server_state_base=str(work / "state"),
        server_state_file=str(work / "state" / "server-state"),
        http_options=HTTPOptions(host=host, port=frontend_port),
        metrics_port=free_port(),
        stats_port=free_port(),
        metrics_enabled=False,
        nbthread=1,
        **({} if timeout_client_s is None else {"timeout_client_s": timeout_client_s}),
    )
    api = HAProxyApi(cfg, config_file_path=str(work / "haproxy.cfg"))
    api.set_backend_configs(
        {
            name: BackendConfig(
                name=name,
                path_prefix=prefix,
                app_name=name,
                servers=[
                    ServerConfig(name=f"{name}-{i}", host="127.0.0.1", port=port)
                    for i, port in enumerate((ports,) if isinstance(ports, int) else ports, 1)
                ],
            )
            for prefix, (name, ports) in servers.items()
        }
    )
    api._generate_config_file_internal()
    return Path(api.config_file_path)


def fake_haproxy(tmp_path: Path) -> Path:
    """Prints its arguments, one a line: what the wrapper exec'd it with."""
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return fake


def test_wrapper_adds_its_lines_once_and_passes_every_argument(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(RAY_CONFIG.format(port=1, error_file=tmp_path / "500.http"))
    wrapper = write_haproxy_wrapper(tmp_path / "bin" / "haproxy", 7, str(fake_haproxy(tmp_path)))
    assert os.access(wrapper, os.X_OK) and is_wrapper(wrapper)
    args = ["-db", "-f", str(cfg), "-dR", "-sf", "123"]
    for _ in range(2):  # Ray re-renders the file and respawns HAProxy on every reload
        run = subprocess.run([str(wrapper), *args], capture_output=True, text=True, check=True)
        assert run.stdout.split("\n")[:-1] == args
    lines = cfg.read_text().splitlines()
    at = lines.index("defaults")
    pages = pages_dir(wrapper)
    added = [
        f"    {CONFIG_MARKER}",
        "    timeout http-request 7s",
        "    option http-buffer-request",
        *(f'    errorfile {s} "{pages / f"{s}.http"}"' for s in STATUSES),
    ]
    assert lines[at + 1 : at + 1 + len(added)] == added
    assert sum("timeout http-request" in line for line in lines) == 1
    # Ray's own errorfile lines are gone: ours are the only ones, so no order matters.
    assert [line for line in lines if line.split()[0] == "errorfile"] == added[3:]
    assert lines[at + 1 + len(added)] == "    mode http"  # the rest untouched
    # /metrics is not public (the default), Serve's text/plain "not found" becomes the
    # 503 page, and /healthz says "ok" alone, once each.
    front = lines.index("frontend http_frontend")
    assert lines[front + 1 : front + 5] == [
        f"    {metrics_rule(pages / METRICS_PAGE)}",
        f"    {NOT_DEPLOYED_RULE}",
        *(f"    {rule}" for rule in HEALTHZ_RULES),
    ]
    for rule in (NOT_DEPLOYED_RULE, *HEALTHZ_RULES, METRICS_ACL):
        assert sum(rule in line for line in lines) == 1
    assert lines[-1] == "    server s1 127.0.0.1:1"
    assert sorted(p.name for p in pages.iterdir()) == sorted(
        [f"{s}.http" for s in STATUSES] + [TENANT_PAGE, METRICS_PAGE]
    )


def test_rays_own_config_with_our_lines_is_valid_for_the_bundled_haproxy(tmp_path: Path) -> None:
    real = real_haproxy_binary()  # ray-haproxy is a dependency: it must be there
    cfg = ray_haproxy_config(tmp_path, free_port(), {"/": ("batchserve", free_port())})
    rendered = cfg.read_text()
    # What the wrapper relies on in Ray's template: a `defaults` line, `http-reuse always`
    # in each backend (made `safe`), and Ray's own errorfile lines (replaced) are the
    # only ones.
    assert "\ndefaults\n" in rendered
    assert [line.strip() for line in rendered.splitlines() if "http-reuse" in line] == [
        "http-reuse always"
    ]
    # ... `option splice-request` (removed: see test_ingress_errors.py -k leaves) ...
    assert [line.strip() for line in rendered.splitlines() if "splice" in line] == [
        "option splice-request",
        "option splice-response",
    ]
    # ... and one 404 for a path no application serves (made the 503 page).
    not_found = [line.strip() for line in rendered.splitlines() if "return status 404" in line]
    assert len(not_found) == 1 and "not found" in not_found[0], not_found
    ray_pages = [line for line in rendered.splitlines() if "errorfile" in line]
    assert [line.split()[:2] for line in ray_pages] == [
        ["errorfile", "502"],
        ["errorfile", "503"],
        ["errorfile", "504"],
    ]
    wrapper = write_haproxy_wrapper(tmp_path / "bin" / "haproxy", 10, real)
    check = subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = cfg.read_text()
    assert "timeout http-request 10s" in text and "option http-buffer-request" in text
    assert [line.strip() for line in text.splitlines() if "http-reuse" in line] == [
        "http-reuse safe"
    ]
    ours = [line.strip() for line in text.splitlines() if line.split()[:1] == ["errorfile"]]
    assert ours == [f'errorfile {s} "{pages_dir(wrapper) / f"{s}.http"}"' for s in STATUSES]
    assert "not found" not in text  # Ray's 404; ours (/metrics) has its own page
    assert [line.strip() for line in text.splitlines() if "return status 404" in line] == [
        metrics_rule(pages_dir(wrapper) / METRICS_PAGE)
    ]
    assert [line.strip() for line in text.splitlines() if "splice" in line] == [
        "option splice-response"
    ]
    assert [line.strip() for line in text.splitlines() if "default-errorfiles" in line] == [
        NOT_DEPLOYED_RULE,
        "http-request return status 503 default-errorfiles",
    ]


def test_error_pages_refuse_a_path_haproxy_would_misread(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot live under"):
        write_haproxy_wrapper(tmp_path / "a$HOME" / "haproxy", 10, "/bin/true")


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
    assert "bind 127.0.0.1:" in text  # HAProxy's side ports on the serve host
    assert f'"${{{PUBLIC_METRICS_ENV}-false}}"' in text  # /metrics not public
    _use_haproxy_wrapper(settings.model_copy(update={"public_metrics": True}))
    assert f'"${{{PUBLIC_METRICS_ENV}-true}}"' in wrapper.read_text()
    assert (pages_dir(wrapper) / "502.http").is_file()
    # A wrapper already configured (the images ship one) is replaced, not wrapped again.
    _use_haproxy_wrapper(settings.model_copy(update={"http_request_timeout_s": 9}))
    text = wrapper.read_text()
    assert "timeout http-request 9s" in text and str(fake) not in text
    assert str(wrapper) not in text.split("exec ", 1)[1]


def side_binds(cfg: Path) -> dict[str, str]:
    """The `bind` of HAProxy's stats page and of its Prometheus exporter in `cfg`."""
    binds: dict[str, str] = {}
    section = ""
    for line in cfg.read_text().splitlines():
        if line and not line[0].isspace():
            section = line
        elif line.split()[:1] == ["bind"] and section in ("listen stats", "frontend prometheus"):
            binds[section] = line.split()[1]
    assert set(binds) == {"listen stats", "frontend prometheus"}, cfg.read_text()
    return binds


def test_side_ports_follow_the_serve_host(tmp_path: Path) -> None:
    """Ray's template binds the stats page (`*:PORT`) and Prometheus exporter (`:PORT`)
    to every interface: on a loopback serve host they move to it; on 0.0.0.0 (the
    cluster) they stay where Ray put them."""
    fake = str(fake_haproxy(tmp_path))
    for host, expect_any in (("127.0.0.1", False), ("0.0.0.0", True), ("::1", False)):
        work = tmp_path / host.replace(":", "_")
        work.mkdir()
        cfg = ray_haproxy_config(work, free_port(), {"/": ("app", free_port())}, host=host)
        ray_binds = side_binds(cfg)
        assert ray_binds["listen stats"].startswith("*:")
        assert ray_binds["frontend prometheus"].startswith(":")
        wrapper = write_haproxy_wrapper(work / "bin" / "haproxy", 5, fake, bind_host=host)
        subprocess.run([str(wrapper), "-f", str(cfg)], check=True, capture_output=True)
        binds = side_binds(cfg)
        if expect_any:
            assert binds == ray_binds
        else:
            assert binds == {
                name: f"{host}:{bind.rsplit(':', 1)[1]}" for name, bind in ray_binds.items()
            }
    with pytest.raises(ValueError, match="not a host"):
        write_haproxy_wrapper(tmp_path / "x" / "haproxy", 5, fake, bind_host="a/b")


def test_main_takes_an_optional_bind_host(tmp_path: Path) -> None:
    from serve.ingress import main

    assert main([str(tmp_path / "a" / "haproxy"), "3"]) == 0
    assert "bind" not in (tmp_path / "a" / "haproxy").read_text()  # the images: Ray's binds
    assert main([str(tmp_path / "b" / "haproxy"), "3", "127.0.0.1"]) == 0
    assert "bind 127.0.0.1:" in (tmp_path / "b" / "haproxy").read_text()
    assert main([str(tmp_path / "c"), "3", "127.0.0.1", "extra"]) == 2
    # The images' limits are the default settings' (the chart's environment overrides them).
    script = (tmp_path / "a" / "haproxy").read_text()
    defaults = Settings()
    assert f"{MAXCONN_ENV}-{defaults.ingress_server_maxconn}}}" in script
    assert f"{TENANT_MAXCONN_ENV}-{defaults.ingress_tenant_maxconn}}}" in script
    # /metrics not public unless the environment (the chart) says so.
    assert f'"${{{PUBLIC_METRICS_ENV}-false}}"' in script
