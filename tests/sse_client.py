"""Reading an event stream as a client does, as it arrives."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


async def data_fields(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a streamed response, one per event, skipping the blank
    separators and `:` heartbeats."""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")
