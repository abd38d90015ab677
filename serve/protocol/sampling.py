"""What a request asks of the sampler, as its client sent it, whichever dialect: each
request model (`RunInput`, the OpenAI requests) produces its `SamplingRequest`, and the
gateway applies defaults, caps and vLLM's ranges to it (`serve.gateway.completion`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


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


class _Asks(Protocol):
    """The fields both dialects name alike, and their `response_format` reading."""

    @property
    def top_p(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def presence_penalty(self) -> float | None: ...
    def structured(self) -> tuple[dict[str, Any] | None, bool]: ...


def sampling_request(
    asks: _Asks,
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    stop: tuple[str, ...] = (),
) -> SamplingRequest:
    """`asks`'s sampling request; the fields the dialects read differently are given."""
    json_schema, json_object = asks.structured()
    return SamplingRequest(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=asks.top_p,
        top_k=top_k,
        seed=asks.seed,
        repetition_penalty=asks.repetition_penalty,
        frequency_penalty=asks.frequency_penalty,
        presence_penalty=asks.presence_penalty,
        stop=stop,
        json_schema=json_schema,
        json_object=json_object,
    )
