"""One structured JSON line per request (logger `batchserve.access`).

Ids, tenant, model, status, token counts and timings. Prompts and generated
text are never written unless the `log_prompts` debug setting is on; secrets
(the bearer token) never are.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from serve.errors import BatchserveError
from serve.gateway.request_record import RequestRecord

ACCESS_LOGGER = "batchserve.access"


class _JsonLines(logging.StreamHandler[TextIO]):
    """Bare lines: the message is already the whole JSON object."""


def log_to_stderr(logger: logging.Logger) -> logging.Logger:
    """Send `logger`'s lines to stderr as bare JSON (a replica's log); safe to call twice."""
    if not any(isinstance(h, _JsonLines) for h in logger.handlers):
        handler = _JsonLines(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _ms(start: float, end: float | None) -> float | None:
    return None if end is None else round((end - start) * 1000.0, 3)


class AccessLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        model: str,
        replica: str,
        enabled: bool = True,
        log_prompts: bool = False,
    ) -> None:
        self._logger = logger
        self.enabled = enabled
        self._model = model
        self._replica = replica
        self.log_prompts = log_prompts

    def line(
        self,
        record: RequestRecord,
        *,
        request_id: str,
        inference_id: str | None,
        method: str,
        path: str,
        status: int,
        ended_at: float,
    ) -> dict[str, Any]:
        start = record.arrived_at
        failure = record.failure
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "event": "request",
            "request_id": request_id,
            "inference_id": inference_id,
            "tenant_id": record.tenant.tenant_id if record.tenant is not None else None,
            "plan": record.plan,
            "model": self._model,
            "replica": self._replica,
            "dialect": record.dialect,
            "method": method,
            "path": path,
            "status": status,
            "stream": record.stream,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "finish_reason": record.finish_reason,
            "queue_ms": _ms(start, record.submitted_at),
            "ttft_ms": _ms(start, record.first_token_at),
            "duration_ms": _ms(start, ended_at),
            "clamped": record.clamped,
            "client_disconnected": record.disconnected,
        }
        if failure is not None:
            line["error_code"] = failure.code if isinstance(failure, BatchserveError) else None
            line["error_type"] = type(failure).__name__
        if self.log_prompts:
            line["prompt_token_ids"] = list(record.prompt_token_ids or ())
            line["output"] = "".join(record.output or ())
        return line

    def write(self, line: dict[str, Any]) -> None:
        if self.enabled and self._logger.isEnabledFor(logging.INFO):
            self._logger.info(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
