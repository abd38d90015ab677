"""Several independent completions (OpenAI's `n`, of one prompt or of each prompt of a
batch), run concurrently."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from serve.gateway.admission import Caller
from serve.gateway.completion import (
    Completion,
    CompletionService,
    PreparedRequest,
    Usage,
    prompt_tokens_of,
)

_SEED_SPAN = 2**64
_SEED_MIN = -(2**63)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i samples with seed+i (kept in the signed 64-bit range), so choices differ."""
    if seed is None:
        return None
    return (seed + index - _SEED_MIN) % _SEED_SPAN + _SEED_MIN


def choice_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{index}"


@dataclass
class Choices:
    """The running completions of one request, in choice order."""

    completions: Sequence[Completion]

    @classmethod
    async def start(
        cls,
        service: CompletionService,
        prepared: Sequence[PreparedRequest],
        caller: Caller | None = None,
        *,
        request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Choices:
        """Admit all choices or none: n choices take n of the replica's slots (with `wait`
        False, refused rather than queued when they are not free)."""
        completions = await service.start_all(
            prepared, caller, request_id=request_id, headers_out=headers_out, wait=wait
        )
        return cls(completions)

    @property
    def usage(self) -> Usage:
        """Each prompt is counted once (its cached tokens: the most any of its choices
        found), the completions of all choices add up."""
        cached: dict[int, int] = {}
        for c in self.completions:
            index = c.prepared.prompt_index
            cached[index] = max(cached.get(index, 0), c.cached_tokens)
        return Usage(
            prompt_tokens_of([c.prepared for c in self.completions]),
            sum(c.completion_tokens for c in self.completions),
            sum(cached.values()),
        )

    async def abandon(self) -> None:
        """End the choices that never started (`Completion.abandon`); the others end
        themselves."""
        for completion in self.completions:
            await completion.abandon()

    async def collect(self) -> list[str]:
        try:
            if len(self.completions) == 1:
                return [await self.completions[0].collect()]
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(c.collect()) for c in self.completions]
            except ExceptionGroup as failed:  # the first failure speaks for the request
                raise failed.exceptions[0] from None
            return [task.result() for task in tasks]
        finally:
            # A choice whose task was cancelled before it ran (another one failed first).
            await self.abandon()

    async def merged(self) -> AsyncGenerator[tuple[int, str | None], None]:
        """(choice index, text delta) as they come, and (index, None) when a choice ends.

        Stopping early (client gone) cancels every choice, which aborts its engine request.
        """
        if len(self.completions) == 1:
            async with contextlib.aclosing(self.completions[0].deltas()) as deltas:
                async for text in deltas:
                    yield 0, text
            yield 0, None
            return
        queue: asyncio.Queue[tuple[int, str | None] | Exception] = asyncio.Queue()

        async def pump(index: int, completion: Completion) -> None:
            try:
                async for text in completion.deltas():
                    queue.put_nowait((index, text))
            except Exception as exc:
                queue.put_nowait(exc)
                return
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(self.completions)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item[1] is None:
                    running -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.abandon()  # a pump cancelled before it ran
