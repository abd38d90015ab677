"""The one place where errors become HTTP responses, in the caller's dialect (or, for the
pages HAProxy answers itself without knowing the dialect, in both at once).

Both dialects share the messages of `serve.errors`, which are worded as hosted Workers AI's
("AiError: Bad input: ..."). OpenAI's clients show `error.message` to their users, so the
OpenAI envelope drops the leading "AiError: " (`openai_error_message`); the rest of the
text, `openai_message` (LiteLLM matches its context-window wording) included, is sent as
written. HAProxy's pages (`both_dialects_body`) are one static body for both dialects:
their OpenAI `error.message` keeps the Workers AI text, prefix and all.
"""

from __future__ import annotations

import json
import logging
import math
from enum import Enum
from http import HTTPStatus
from typing import Any

from starlette.responses import Response

from serve.errors import BatchserveError, EngineFailure
from serve.gateway.security_headers import SECURITY_HEADERS

log = logging.getLogger(__name__)


class Dialect(Enum):
    WORKERS_AI = "workers_ai"
    OPENAI = "openai"


def dialect_of(path: str) -> Dialect:
    """OpenAI routes live under /v1/ and /client/v4/accounts/{id}/ai/v1/."""
    if path.startswith("/v1/") or path == "/v1" or "/ai/v1/" in path:
        return Dialect.OPENAI
    return Dialect.WORKERS_AI


def as_batchserve_error(exc: BaseException) -> BatchserveError:
    """Ours as they are; anything else is logged and becomes a bare 500 (no details leak)."""
    if isinstance(exc, BatchserveError):
        return exc
    log.error("unhandled error", exc_info=exc)
    return EngineFailure()


# Hosted Workers AI's prefix of every error message, which OpenAI's errors do not have.
WORKERS_AI_PREFIX = "AiError: "


def openai_error_message(err: BatchserveError) -> str:
    """`error.message` of the OpenAI dialect: OpenAI's wording where the error has one,
    without Workers AI's leading "AiError: "."""
    return (err.openai_message or err.message).removeprefix(WORKERS_AI_PREFIX)


def _openai_body(err: BatchserveError, message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": err.openai_type,
            "param": err.param,
            "code": err.openai_code or str(err.code),
        }
    }


def error_body(err: BatchserveError, dialect: Dialect) -> dict[str, Any]:
    if dialect is Dialect.OPENAI:
        return _openai_body(err, openai_error_message(err))
    error: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.chain:
        error["error_chain"] = [{"code": code, "message": text} for code, text in err.chain]
    return {
        "result": None if err.gateway_layer else {},
        "success": False,
        "errors": [error],
        "messages": [],
    }


def error_status(err: BatchserveError, dialect: Dialect) -> int:
    """OpenAI's clients expect a 401 for a missing or malformed key, a 404 for an unknown
    model and a 400 for an over-long request (`BatchserveError.openai_status`)."""
    if dialect is Dialect.OPENAI and err.openai_status is not None:
        return err.openai_status
    return err.status


def error_headers(err: BatchserveError) -> dict[str, str]:
    headers = {"Connection": "close"} if err.close_connection else {}
    if err.status == 405:  # a 405 must say what is allowed (RFC 9110)
        headers["Allow"] = ", ".join(err.allowed)
    if err.retry_after_s is None:
        return headers
    return {
        **headers,
        "Retry-After": str(max(1, math.ceil(err.retry_after_s))),
        "retry-after-ms": str(max(1, int(err.retry_after_s * 1000))),
    }


def error_response(err: BatchserveError, dialect: Dialect) -> Response:
    body = json.dumps(error_body(err, dialect), ensure_ascii=False, separators=(",", ":"))
    return Response(
        content=body,
        status_code=error_status(err, dialect),
        media_type="application/json",
        headers=error_headers(err),
    )


def both_dialects_body(err: BatchserveError) -> dict[str, Any]:
    """One object that is an error envelope of both dialects at once: the Workers AI keys
    (`result`, `success`, `errors`, `messages`) and OpenAI's `error`. For responses written
    where the dialect is not known (HAProxy's own error pages, `serve.ingress_errors`).
    Being one static body, it has one message: `error.message` is the Workers AI text,
    "AiError: " included, like `errors[0].message`."""
    return {
        **error_body(err, Dialect.WORKERS_AI),
        **_openai_body(err, err.openai_message or err.message),
    }


def raw_error_response(err: BatchserveError) -> bytes:
    """`err` as a complete HTTP/1.1 response with the body of both dialects: status line,
    headers (JSON, not cached, connection closed), blank line, body. HAProxy's `errorfile`
    format."""
    body = json.dumps(both_dialects_body(err), ensure_ascii=False, separators=(",", ":"))
    payload = body.encode()
    status = HTTPStatus(err.status)
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(payload)),
        # The gateway's standard security headers (Cache-Control: no-store among them).
        **{name.decode(): value.decode() for name, value in SECURITY_HEADERS},
        **error_headers(err),
        "Connection": "close",
    }
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode("latin-1") + payload
