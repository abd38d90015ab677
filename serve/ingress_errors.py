"""The responses HAProxy writes itself (Serve's direct ingress), as JSON error envelopes.

When HAProxy cannot hand a request to a replica, or the replica goes away before it
answered, HAProxy answers on its own: 502 when the replica closed the connection without a
response (its actor was killed), 503 when no replica could be reached, 504 when `timeout
server` expired, 408 when a body did not arrive within `timeout http-request`, 500 on an
internal error, 429 when its load shedding refuses a request (`serve.ingress`), and 403
should a deny rule ever be added. Its own pages are
`text/plain` or HTML, and Ray 2.60 replaces 502/503/504 with a single `text/plain` 500
("Internal Server Error"). One HAProxy frontend serves both dialects and an `errorfile` is
static, so each page here is one JSON object that is an error envelope of both dialects at
once (`serve.gateway.error_wire.both_dialects_body`), with the status HAProxy chose and the
code the gateway uses for the same situation. Being one body, its OpenAI `error.message` is
the Workers AI message, "AiError: " included, which the gateway's own OpenAI errors drop:

- 502: the replica died under the request: 3008 `server_error`, like an engine that dies
  under an in-flight request;
- 503: no replica reachable: 3040 with `Retry-After`, like a cluster out of capacity;
- 504 and 408: 3007 `timeout_error`, like the gateway's request and body timeouts;
- 400 / 501: 5006 `invalid_request_error`; 500: 3008; 403: 10000; 429: 3040, and
  TENANT_PAGE, another 429/3040 whose message names the tenant's own excess;
- METRICS_PAGE: 404/7003 `invalid_request_error`, the gateway's answer for a route it does
  not have, for `/metrics` on the public port (`serve.ingress`; not an `errorfile` line:
  only its rule answers it).

`result` is null in all of them: the gateway never answered. The wrapper of
`serve.ingress` removes Ray's `errorfile` lines (for one code, the last `errorfile` in a
section wins; removing them leaves no order to depend on) and adds one `errorfile` line
per page to the `defaults` section, which every frontend and backend inherits.

What no page changes (HAProxy 2.8, tests/unit/test_ingress_errors.py): its HTTP/1 layer
answers by itself, with built-in pages, before a request exists: 400 for a request it
cannot parse, 408 for headers not complete within `timeout http-request`, 501 for a
Transfer-Encoding it does not implement (the pages for these codes still serve where
HAProxy answers them once the request exists, as 408 for a late body). And when a
replica closes without a response a connection HAProxy had kept idle and reused for the
request, HAProxy closes the client's connection without any response, so that the client
retries; the wrapper's `http-reuse safe` leaves that to requests that came on a reused
client connection (`serve.ingress`).
"""

from __future__ import annotations

import os
from pathlib import Path

from serve.errors import (
    AccountForbidden,
    BadInput,
    BatchserveError,
    EngineFailure,
    EngineUnavailable,
    OutOfCapacity,
    RequestTimeout,
    RouteNotFound,
)
from serve.gateway.error_wire import raw_error_response

# HAProxy refuses an errorfile larger than its buffer (tune.bufsize, 16 KiB by default,
# less the 1 KiB kept for header rewrites); ours are well under 1 KiB.
MAX_PAGE_BYTES = 8192
# Characters HAProxy would read as quoting, escapes or environment variables even inside
# double quotes, and that would break the wrapper's sed command.
_UNSAFE_IN_PATH = ('"', "\\", "$", "\n", "\r")


class IngressError(BatchserveError):
    """An error HAProxy answers itself, carrying the code and OpenAI type of the
    gateway's error `like` for the same situation."""

    gateway_layer = True
    close_connection = True

    def __init__(
        self,
        status: int,
        like: type[BatchserveError],
        message: str,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.status = status
        self.code = like.code
        self.openai_type = like.openai_type
        self.openai_code = like.openai_code


def ingress_errors(http_request_timeout_s: int) -> list[IngressError]:
    """One error per status HAProxy can answer itself."""
    retry = ", please retry"
    return [
        IngressError(
            400, BadInput, "AiError: Bad input: the HTTP request is malformed or too large"
        ),
        IngressError(403, AccountForbidden, "Forbidden: the ingress refused this request"),
        IngressError(
            408,
            RequestTimeout,
            "AiError: Request timeout: the request took longer than "
            f"{int(http_request_timeout_s)} s to arrive",
        ),
        IngressError(
            429,
            OutOfCapacity,
            "Capacity temporarily exceeded, please try again.",
            retry_after_s=1.0,
        ),
        IngressError(500, EngineFailure, f"AiError: Internal error in the ingress{retry}"),
        IngressError(501, BadInput, "AiError: Bad input: this Transfer-Encoding is not supported"),
        replica_gone(),
        IngressError(
            503,
            EngineUnavailable,
            f"AiError: No replica is available to serve this request{retry}",
            retry_after_s=1.0,
        ),
        IngressError(
            504, RequestTimeout, f"AiError: Request timeout: the replica did not answer{retry}"
        ),
    ]


def replica_gone() -> IngressError:
    """502/3008: the replica died under the request (HAProxy's page, and what a dead
    replica's keeper answers, serve.gateway.last_words)."""
    return IngressError(
        502,
        EngineFailure,
        "AiError: The replica serving this request went away, please retry",
        retry_after_s=1.0,
    )


# The 429 page of a request over its tenant's share of the ingress (serve/ingress.py): a
# tenant's own excess, as the gateway's "too many queued requests" refusal says.
TENANT_PAGE = "429-tenant.http"


def tenant_refusal() -> IngressError:
    return IngressError(
        429,
        OutOfCapacity,
        "Rate limited: too many requests in flight for this tenant, please try again.",
        retry_after_s=1.0,
    )


# The 404 HAProxy answers for `/metrics` on the public port (serve/ingress.py,
# `Settings.public_metrics`): what the gateway answers for a route it does not have.
METRICS_PAGE = "404-metrics.http"
METRICS_PATH = "/metrics"


def metrics_refusal() -> IngressError:
    return IngressError(404, RouteNotFound, RouteNotFound(METRICS_PATH).message)


def pages_dir(wrapper: Path) -> Path:
    """Where the pages of the wrapper at `wrapper` live: next to it."""
    return wrapper.with_name(wrapper.name + "-errors")


def write_error_pages(directory: Path, http_request_timeout_s: int) -> dict[int, Path]:
    """Write one `<status>.http` file per status, TENANT_PAGE and METRICS_PAGE into `directory`;
    return the absolute paths of the former, by status."""
    directory = directory.absolute()
    if any(c in str(directory) for c in _UNSAFE_IN_PATH):
        raise ValueError(f"HAProxy error pages cannot live under {str(directory)!r}")
    directory.mkdir(parents=True, exist_ok=True)
    _write_page(directory / TENANT_PAGE, tenant_refusal())
    _write_page(directory / METRICS_PAGE, metrics_refusal())
    return {
        err.status: _write_page(directory / f"{err.status}.http", err)
        for err in ingress_errors(http_request_timeout_s)
    }


def _write_page(path: Path, err: IngressError) -> Path:
    raw = raw_error_response(err)
    if len(raw) >= MAX_PAGE_BYTES:
        raise ValueError(f"the {path.name} page is {len(raw)} bytes, HAProxy's limit is lower")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)
    return path


def errorfile_lines(pages: dict[int, Path]) -> list[str]:
    """The `defaults` lines that make HAProxy answer with the pages."""
    return [f'errorfile {status} "{path}"' for status, path in sorted(pages.items())]
