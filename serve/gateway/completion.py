"""One generation, from a tokenized prompt to settled usage; shared by both dialects.

`CompletionService.prepare` applies the token budget rules (default
max_tokens, the non-streaming cap, then the context window) and
`CompletionService.start` admits the request against the replica's capacity.
The returned `Completion` streams deltas and always settles its usage and
releases its slot, whichever way it ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve.errors import ContextWindowExceeded, OutOfCapacity
from serve.replica.engine import Engine, FinishReason, GenerateRequest, SamplingOptions

# vLLM requires 0 < top_p <= 1 and repetition_penalty > 0; the Workers AI schema
# allows 0..2 for both, so schema-legal values outside vLLM's range are mapped
# to the nearest value vLLM accepts.
_MIN_TOP_P = 1e-6
_MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling fields as a client sent them (None = not given)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: tuple[str, ...] = ()
    json_schema: Mapping[str, Any] | None = None
    json_object: bool = False


@dataclass(frozen=True)
class Budget:
    """The token limits that decide how a request may run."""

    context_window: int
    default_max_tokens: int
    default_temperature: float
    non_stream_max_tokens: int


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerateRequest
    stream: bool
    # max_tokens was lowered to the non-streaming cap.
    clamped: bool


def plan_sampling(
    asked: SamplingRequest, *, prompt_tokens: int, stream: bool, budget: Budget
) -> tuple[SamplingOptions, bool]:
    """Apply defaults, the non-streaming cap and the context window rule.

    The cap comes first: a non-streaming request is refused only when even its
    clamped max_tokens does not fit the window.
    """
    max_tokens = asked.max_tokens if asked.max_tokens is not None else budget.default_max_tokens
    max_tokens = max(max_tokens, 1)
    clamped = not stream and max_tokens > budget.non_stream_max_tokens
    if clamped:
        max_tokens = budget.non_stream_max_tokens
    if prompt_tokens + max_tokens > budget.context_window:
        raise ContextWindowExceeded(prompt_tokens + max_tokens, budget.context_window)
    top_p = 1.0 if asked.top_p is None else min(max(asked.top_p, _MIN_TOP_P), 1.0)
    repetition = asked.repetition_penalty
    options = SamplingOptions(
        max_tokens=max_tokens,
        temperature=budget.default_temperature if asked.temperature is None else asked.temperature,
        top_p=top_p,
        top_k=asked.top_k,
        seed=asked.seed,
        repetition_penalty=1.0 if repetition is None else max(repetition, _MIN_REPETITION_PENALTY),
        frequency_penalty=asked.frequency_penalty or 0.0,
        presence_penalty=asked.presence_penalty or 0.0,
        stop=asked.stop,
        json_schema=asked.json_schema,
        json_object=asked.json_object and asked.json_schema is None,
    )
    return options, clamped


@dataclass
class Completion:
    """A running generation; iterate `deltas()` once, then read the totals."""

    prepared: PreparedRequest
    _service: CompletionService
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prepared.request.prompt_token_ids), self.completion_tokens)

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text deltas; aborts the engine request if the consumer stops early."""
        self._service.inflight += 1
        stream = self._service.engine.generate(self.prepared.request)
        try:
            async for delta in stream:
                self.completion_tokens += delta.new_tokens
                if delta.finish_reason is not None:
                    self.finish_reason = delta.finish_reason
                if delta.text:
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    yield delta.text
        finally:
            self._service.inflight -= 1
            # Closing the engine stream is what aborts an unfinished engine request.
            await stream.aclose()

    async def collect(self) -> str:
        return "".join([text async for text in self.deltas()])


class CompletionService:
    """Admission and token budgets for one engine."""

    def __init__(
        self, engine: Engine, budget: Budget, *, max_inflight: int, retry_after_s: float
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self.started_total = 0

    def prepare(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        asked: SamplingRequest,
        stream: bool,
        cache_salt: str | None,
    ) -> PreparedRequest:
        options, clamped = plan_sampling(
            asked, prompt_tokens=len(prompt_token_ids), stream=stream, budget=self.budget
        )
        request = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=options,
            cache_salt=cache_salt,
        )
        return PreparedRequest(request=request, stream=stream, clamped=clamped)

    def start(self, prepared: PreparedRequest) -> Completion:
        """Admit the request or refuse it with 429/3040 (never queue without bound)."""
        if self.inflight >= self.max_inflight:
            raise OutOfCapacity(retry_after_s=self.retry_after_s)
        self.started_total += 1
        return Completion(prepared=prepared, _service=self)
