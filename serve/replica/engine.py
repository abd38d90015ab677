"""The seam between the gateway and an inference engine.

The gateway only ever talks to an `Engine`; `vllm_engine.VllmEngine` is the
production implementation and tests may pass a fake.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling already mapped to values any engine accepts."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    # Structured output: constrain the text to this JSON schema, or (json_object)
    # to any JSON object. At most one is set.
    json_schema: Mapping[str, Any] | None = None
    json_object: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingOptions
    # Per-tenant salt: prefix-cache entries are never shared across tenants.
    cache_salt: str | None = None
    # W3C trace context of the gateway span (tracing on), so engine spans nest under it.
    trace_headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class TokenDelta:
    """New text since the previous delta and how many tokens it holds."""

    text: str
    new_tokens: int
    finish_reason: FinishReason | None = None
    # Prompt tokens served from the prefix cache (known once the prompt is scheduled).
    cached_tokens: int | None = None


@dataclass(frozen=True)
class EngineInfo:
    weights: str
    context_window: int
    # Token ids a prompt may hold: 0 to vocab_size - 1.
    vocab_size: int
    extra: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    """One model's inference engine, owned by one replica."""

    @property
    def info(self) -> EngineInfo: ...

    async def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Render the model's chat template (generation prompt added) and tokenize.
        A large prompt is tokenized off the event loop, so other streams go on."""
        ...

    async def encode_raw(self, prompt: str) -> list[int]:
        """Tokenize the prompt verbatim: no template, no special tokens added."""
        ...

    def check_sampling(self, options: SamplingOptions) -> None:
        """Raise `BadInput` for options the engine would refuse (a `response_format`
        schema it cannot compile), so the client gets a 400 before any byte of a stream."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream deltas; closing the iterator early aborts the engine request."""
        ...

    def num_unfinished_requests(self) -> int: ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    def shutdown(self) -> None: ...
