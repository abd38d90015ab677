"""`GET /client/v4/accounts/{account_id}/ai/usage`: per-model totals of one account."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from starlette.responses import Response

from serve.errors import BadInput
from serve.gateway import openapi_doc
from serve.gateway.context import GatewayContext
from serve.gateway.envelope import envelope

USAGE_PATH = "/client/v4/accounts/{account_id}/ai/usage"
_FIRST, _LAST = 0.0, datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def parse_instant(value: str | None, name: str, default: float) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC when no zone is given)."""
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(
                f"{name} must be epoch seconds or an ISO 8601 time", param=name
            ) from None
        seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if not _FIRST <= seconds <= _LAST:  # also NaN; the response echoes it as a date
        raise BadInput(f"{name} must be between 1970 and 9999", param=name)
    return seconds


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def usage_router(ctx: GatewayContext) -> APIRouter:
    router = APIRouter()

    @router.get(USAGE_PATH, **openapi_doc.workers_ai_usage())
    async def usage(request: Request, account_id: str) -> Response:
        ctx.authenticate(request, account_id)
        params = request.query_params
        since = parse_instant(params.get("since"), "since", 0.0)
        until = parse_instant(params.get("until"), "until", time.time() + 1)
        if until <= since:
            raise BadInput("until must be later than since", param="until")
        if ctx.ledger is None:
            totals = []
        else:
            totals = list(await ctx.ledger.totals(account_id, since, until))
        result = {
            "account_id": account_id,
            "since": iso(since),
            "until": iso(until),
            "models": [t.as_dict() for t in totals],
        }
        return envelope(result, [])

    return router
