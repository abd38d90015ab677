"""Reading request bodies under a size limit and a deadline, before anything parses them."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from serve.errors import BodyTimeout, BodyTooLarge, UnsupportedContentEncoding


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, or 415 when it is compressed (Content-Encoding: gzip, ...), or
    413 past `limit` bytes, or 408 when it is not all there within
    `timeout_s` (a client trickling its upload holds a connection and this task, nothing
    more, and only for that long)."""
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):
        raise UnsupportedContentEncoding(coding)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(timeout_s or 0.0) from None
    return b"".join(chunks)
