"""The Workers AI success envelope, `{"result", "success", "errors", "messages"}`, which
every route of that dialect answers in (errors: `serve.gateway.error_wire`)."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


def envelope(
    result: dict[str, Any] | list[Any],
    messages: list[dict[str, Any]],
    *,
    result_info: dict[str, int] | None = None,
) -> Response:
    body: dict[str, Any] = {"result": result, "success": True, "errors": [], "messages": messages}
    if result_info is not None:  # a paged listing's `{page, per_page, count, total_count}`
        body["result_info"] = result_info
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        media_type="application/json",
    )
