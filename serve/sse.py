"""Server-sent-events framing shared by both dialects (pure functions)."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
# A bare comment line. Kept to one character on purpose: LangChain's CloudflareWorkersAI
# json-decodes every line longer than len("data: ") (so `: keep-alive` would crash it).
HEARTBEAT = b":\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One `data:` event: compact JSON on a single line, then a blank line."""
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )
